"""LLCCallback inside a Trainer: isolation, schedule, resume, logging and bad input."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_patterning as lp
from lightning_patterning.observables import LLC
from tests.lightning_models import RegressionModule

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=3, num_draws=15, batch_size=16)


def _trainer(tmp_path, callbacks, max_steps=24, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _train(tmp_path, callbacks, seed=0, **kwargs):
    L.seed_everything(seed, verbose=False)
    model = RegressionModule()
    trainer = _trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return model, trainer


def test_estimation_leaves_training_bitwise_unchanged(tmp_path):
    """Weights, optimizer state, BatchNorm buffers and the global RNG stream match a run without it."""
    plain_model, plain_trainer = _train(tmp_path / "a", [])
    plain_rng = torch.get_rng_state()
    callback = lp.LLCCallback(CONFIG, every_n_train_steps=4, progress=False)
    model, trainer = _train(tmp_path / "b", [callback])
    assert len(callback.history) == 6
    assert torch.equal(torch.get_rng_state(), plain_rng)
    for (name, a), (_, b) in zip(plain_model.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name  # parameters and BatchNorm running statistics / counters
    plain_opt = plain_trainer.optimizers[0].state_dict()["state"]
    opt = trainer.optimizers[0].state_dict()["state"]
    for key in plain_opt:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(plain_opt[key][field], opt[key][field])
    assert all(m.training for m in model.modules())  # train flags restored


def test_schedule_every_n_steps_epochs_and_log_spaced(tmp_path):
    steps = lp.LLCCallback(CONFIG, every_n_train_steps=10, progress=False)
    epochs = lp.LLCCallback(CONFIG, every_n_epochs=2, progress=False, name="llc_epoch")
    log = lp.LLCCallback(CONFIG, log_spaced_steps=4, progress=False, name="llc_log")
    _train(tmp_path, [steps, epochs, log], max_steps=32)  # 16 batches per epoch -> 2 epochs
    assert [h["step"] for h in steps.history] == [10, 20, 30]
    assert [h["step"] for h in epochs.history] == [32]
    assert log.schedule.log_steps == [1, 3, 10, 32]
    assert [h["step"] for h in log.history] == [1, 3, 10, 32]


def test_gradient_accumulation_runs_once_per_optimizer_step(tmp_path):
    callback = lp.LLCCallback(CONFIG, every_n_train_steps=3, progress=False)
    _train(tmp_path, [callback], max_steps=6, accumulate_grad_batches=2)
    assert [h["step"] for h in callback.history] == [3, 6]


def test_logs_scalars_and_trace_figure_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = lp.LLCCallback(CONFIG, every_n_train_steps=7, progress=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _train(tmp_path, [callback], max_steps=14, logger=logger, log_every_n_steps=50)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"llc/mean", "llc/std", "llc/stderr", "llc/sgld/diverged_chains", "llc/sgld/noise_norm"} <= set(
        tags["scalars"]
    )
    logged = [(e.step, e.value) for e in events.Scalars("llc/mean")]
    assert logged == [(h["step"], pytest.approx(h["mean"], rel=1e-6)) for h in callback.history]
    assert [e.step for e in events.Images("llc/traces")] == [7, 14]


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_continues_schedule_and_history_exactly(tmp_path):
    """Crash mid-training, resume from the last checkpoint: no run duplicated or lost, same numbers."""

    def model() -> RegressionModule:
        L.seed_everything(0, verbose=False)
        return RegressionModule(dropout=0.0, shuffle=False)

    full = lp.LLCCallback(CONFIG, every_n_train_steps=5, progress=False)
    _trainer(tmp_path / "full", [full], max_steps=40).fit(model())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=16, save_top_k=-1)
    first = lp.LLCCallback(CONFIG, every_n_train_steps=5, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(
            tmp_path / "crash", [first, checkpoint, _CrashAt(28)], max_steps=40, enable_checkpointing=True
        ).fit(model())
    assert [h["step"] for h in first.history] == [5, 10, 15, 20, 25]

    resumed = lp.LLCCallback(CONFIG, every_n_train_steps=5, progress=False)
    _trainer(tmp_path / "resume", [resumed], max_steps=40).fit(
        model(), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=16.ckpt"
    )
    assert [h["step"] for h in resumed.history] == [5, 10, 15, 20, 25, 30, 35, 40]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["mean"] == b["mean"] and a["std"] == b["std"]


def test_several_instances_keep_separate_state(tmp_path):
    whole = lp.LLCCallback(CONFIG, every_n_train_steps=6, progress=False)
    last = lp.LLCCallback(CONFIG, every_n_train_steps=6, restrict="net.4.*", name="llc_last", progress=False)
    assert whole.state_key != last.state_key
    _, trainer = _train(tmp_path, [whole, last], max_steps=12)
    assert len(whole.history) == len(last.history) == 2
    assert all(math.isfinite(h["mean"]) for h in whole.history + last.history)
    assert "llc_last/mean" in trainer.callback_metrics


class _NoLossModule(RegressionModule):
    per_sample_loss = None  # type: ignore[assignment]


def test_module_without_per_sample_loss_fails_at_setup(tmp_path):
    callback = lp.LLCCallback(CONFIG, every_n_train_steps=5)
    with pytest.raises(MisconfigurationException, match=r"def per_sample_loss\(self, batch\)"):
        _trainer(tmp_path, [callback]).fit(_NoLossModule())


def test_restriction_matching_nothing_fails_at_setup(tmp_path):
    callback = lp.LLCCallback(CONFIG, every_n_train_steps=5, restrict=["encoder.*"])
    with pytest.raises(MisconfigurationException, match=r"restrict: pattern 'encoder\.\*' matches no"):
        _trainer(tmp_path, [callback]).fit(RegressionModule())


def test_loss_fn_with_wrong_shape_fails_before_training(tmp_path):
    def mean_loss(module, batch):
        x, y = batch
        return ((module(x) - y) ** 2).mean()

    callback = lp.LLCCallback(CONFIG, every_n_train_steps=5, loss_fn=mean_loss)
    model = RegressionModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"loss_fn must return per-sample losses of shape \[batch\] = \[16\]"
    ):
        _trainer(tmp_path, [callback]).fit(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(config=CONFIG), ValueError, "needs a schedule"),
        (dict(config=CONFIG, every_n_train_steps=0), ValueError, "every_n_train_steps"),
        (dict(config={"lr": 1e-3}, every_n_train_steps=5), TypeError, "config must be an lp.SGLDConfig"),
        (dict(config=CONFIG, every_n_train_steps=5, loss_fn="mse"), TypeError, "loss_fn must be callable"),
        (dict(config=CONFIG, every_n_train_steps=5, name="a/b"), ValueError, "name"),
        (dict(config=CONFIG, every_n_train_steps=5, first_step=10), ValueError, "log-spaced schedule only"),
        (dict(config=CONFIG, every_n_train_steps=5, last_step=50), ValueError, "log-spaced schedule only"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        lp.LLCCallback(**kwargs)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
@pytest.mark.parametrize("owner", ["LLCCallback", "SusceptibilityCallback", "PatterningCallback"])
def test_sharded_strategies_are_refused(strategy, owner):
    from types import SimpleNamespace

    from lightning.pytorch import strategies

    cls = getattr(strategies, strategy)
    trainer = SimpleNamespace(strategy=cls.__new__(cls))
    with pytest.raises(MisconfigurationException, match=f"{owner} does not support the {strategy}"):
        lp.callbacks.trainer_adapters.check_strategy(trainer, owner)


class _RecordRichTasks(L.Callback):
    """Records the descriptions of the tasks added to ``RichProgressBar``'s live display."""

    def __init__(self) -> None:
        self.tasks: list[str] = []

    def on_train_start(self, trainer, pl_module):
        progress = trainer.progress_bar_callback.progress
        add_task = progress.add_task

        def record(description, *args, **kwargs):
            self.tasks.append(description)
            return add_task(description, *args, **kwargs)

        progress.add_task = record


@pytest.mark.parametrize("bar", ["tqdm", "rich", "none"])
def test_progress_bar_is_labelled_and_follows_the_trainers_bar(tmp_path, capfd, bar):
    """Next to Lightning's tqdm bar ours is a tqdm bar that says which callback and step it belongs to;
    next to ``RichProgressBar`` it is a task of Rich's live display (a tqdm bar would garble it); with
    ``enable_progress_bar=False`` there is none."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    callback = lp.LLCCallback(CONFIG, every_n_train_steps=5, name="llc_bar", progress=True)
    recorder = _RecordRichTasks()
    extra = {"tqdm": [TQDMProgressBar()], "rich": [RichProgressBar(), recorder], "none": []}[bar]
    _train(tmp_path, [*extra, callback], max_steps=5, enable_progress_bar=bar != "none")
    err = capfd.readouterr().err
    label = "llc_bar @ step 5 (3 chains, vmap)"
    assert (label in err) == (bar == "tqdm"), err[-2000:]
    assert recorder.tasks.count(label) == (bar == "rich")


class _FrozenModule(RegressionModule):
    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)


@pytest.mark.parametrize("owner", ["LLCCallback", "SusceptibilityCallback"])
def test_a_model_without_trainable_parameters_fails_at_setup_saying_so(tmp_path, owner):
    observables = {"observables": [LLC()]} if owner == "SusceptibilityCallback" else {}
    callback = getattr(lp, owner)(CONFIG, every_n_train_steps=5, **observables)
    with pytest.raises(
        MisconfigurationException, match=r"_FrozenModule has no trainable parameters"
    ) as caught:
        _trainer(tmp_path, [callback]).fit(_FrozenModule())
    assert "restrict" not in str(caught.value)
