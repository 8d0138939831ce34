"""Non-finite values never stop training: a NaN sample in the SGLD data drops exactly the chains that draw
it (the others are untouched), estimates that cannot be made are skipped with a warning naming the cause,
nothing NaN is logged, and a skipped patterning update leaves the sampler's weights alone."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_patterning as lp
from lightning_patterning.observables import LLC, ProbeLoss
from lightning_patterning.sgld.batches import ChainBatches, SampleSource, reference_indices
from lightning_patterning.sgld.divergence import NonFiniteCheckpointError, NonFiniteLossWarning
from tests.conftest import Regression, squared_error
from tests.patterning_problem import LinearRegressor, MixtureData, sources

NAN_SAMPLE = 37


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_nan(dataset: TensorDataset, index: int = NAN_SAMPLE) -> TensorDataset:
    """A copy of ``dataset`` whose sample ``index`` has a NaN input."""
    x, *rest = dataset.tensors
    x = x.clone()
    x[index, 0] = float("nan")
    return TensorDataset(x, *rest)


def chains_drawing(dataset, config: lp.SGLDConfig, run: int, index: int = NAN_SAMPLE) -> torch.Tensor:
    """``[chains]`` True for the chains whose minibatch stream (seeded by (seed, run, chain)) contains
    ``index`` within the run's steps: the chains that must be dropped."""
    stream = ChainBatches(
        SampleSource(dataset), config.batch_size, range(config.num_chains), config.seed, run
    )
    hit = torch.zeros(config.num_chains, dtype=torch.bool)
    for _ in range(config.num_steps):
        hit |= (stream.next_indices() == index).any(dim=1)
    return hit


def nan_free_scalars(log_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------- functional


@pytest.mark.parametrize("chain_mode", ["vmap", "sequential"])
def test_nan_sample_drops_exactly_the_chains_that_draw_it_and_leaves_the_others_unchanged(
    regression: Regression, chain_mode: str
) -> None:
    """10 draws: every draw samples devinterp's diagnostics, whose internal assert used to crash on a NaN
    gradient. Chains that never draw the NaN sample give bitwise the numbers of a run on clean data."""
    config = lp.SGLDConfig(
        lr=1e-3,
        nbeta=30.0,
        localization=100.0,
        num_chains=6,
        num_draws=10,
        batch_size=32,
        chain_mode=chain_mode,
    )
    clean = lp.estimate_llc(regression.model(), squared_error, regression.dataset, config)
    poisoned = with_nan(regression.dataset)
    expected = chains_drawing(poisoned, config, run=0)
    assert 0 < int(expected.sum()) < config.num_chains  # the seed gives both kinds of chains
    with pytest.warns(NonFiniteLossWarning, match=rf"non-finite loss .* from samples \[{NAN_SAMPLE}\]"):
        result = lp.estimate_llc(regression.model(), squared_error, poisoned, config)
    assert torch.equal(result.diverged, expected)
    assert torch.equal(result.per_chain[~expected], clean.per_chain[~expected])
    assert math.isfinite(result.mean)
    assert result.mean == pytest.approx(float(clean.per_chain[~expected].mean()))


def test_non_finite_weights_at_the_checkpoint_raise_an_error_naming_the_weights(regression: Regression):
    model = regression.model()
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    config = lp.SGLDConfig(num_chains=2, num_draws=3, batch_size=16)
    with pytest.raises(NonFiniteCheckpointError, match=r"weights are non-finite: \[bias\]") as caught:
        lp.estimate_llc(model, squared_error, regression.dataset, config)
    assert caught.value.cause == "weights"


def test_nan_sample_in_the_fixed_loss_batches_raises_an_error_naming_the_data(regression: Regression):
    config = lp.SGLDConfig(num_chains=2, num_draws=3, batch_size=32)
    fixed = torch.cat(reference_indices(len(regression.dataset), 32, 4, config.seed, 0))
    index = int(fixed[5])
    with pytest.raises(NonFiniteCheckpointError, match=rf"samples \[{index}\] of the SGLD data") as caught:
        lp.estimate_susceptibilities(
            regression.model(),
            squared_error,
            with_nan(regression.dataset, index),
            config,
            [LLC()],
            probe=regression.dataset,
            probe_indices=list(range(8)),
        )
    assert caught.value.cause == "data" and caught.value.sample_ids == [index]


# ---------------------------------------------------------------------------------------------- callbacks


def _trainer(tmp_path, callbacks, steps, logger=False) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )


CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=4, num_draws=10, batch_size=32)


def _fit(tmp_path, callback, sgld_data: TensorDataset | None = None, steps: int = 30, logger=False):
    train, _, labels = sources(0)
    L.seed_everything(0, verbose=False)
    data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
    trainer = _trainer(tmp_path, [callback], steps, logger)
    trainer.fit(LinearRegressor(), datamodule=data)
    assert trainer.global_step == steps  # fit completed
    return data


def test_llc_callback_with_a_nan_sample_uses_only_the_finite_chains_and_logs_no_nan(tmp_path):
    train, _, _ = sources(0)
    poisoned = with_nan(train)
    clean_cb = lp.LLCCallback(
        CONFIG, every_n_train_steps=10, dataloader=DataLoader(train, batch_size=32), progress=False
    )
    _fit(tmp_path / "clean", clean_cb)
    callback = lp.LLCCallback(
        CONFIG, every_n_train_steps=10, dataloader=DataLoader(poisoned, batch_size=32), progress=False
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path / "nan", callback, logger=logger)
    expected = [chains_drawing(poisoned, CONFIG, run) for run in range(3)]
    assert [h["diverged_chains"] for h in callback.history] == [float(e.sum()) for e in expected]
    assert sum(int(e.sum()) for e in expected) > 0
    last = expected[-1]
    assert torch.equal(callback.latest.diverged, last)
    assert torch.equal(callback.latest.per_chain[~last], clean_cb.latest.per_chain[~last])
    messages = [str(w.message) for w in caught if issubclass(w.category, NonFiniteLossWarning)]
    assert messages and all(f"from samples [{NAN_SAMPLE}]" in m for m in messages)
    scalars = nan_free_scalars(logger.log_dir)
    assert "llc/mean" in scalars
    assert all(math.isfinite(v) for values in scalars.values() for v in values)


def test_susceptibility_callback_skips_estimates_it_cannot_make_and_drops_chains_otherwise(tmp_path):
    """The NaN sample sits in run 0's fixed loss batches (no estimate possible: skipped with a warning
    naming the data) and outside run 1's (an estimate from the chains that never draw it)."""
    train, held_b, _ = sources(0)
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=4, num_draws=10, batch_size=32)
    in_first = set(torch.cat(reference_indices(len(train), 32, 2, config.seed, 0)).tolist())
    in_second = set(torch.cat(reference_indices(len(train), 32, 2, config.seed, 1)).tolist())
    probe = set(range(0, 800, 50))
    index = min(in_first - in_second - probe)
    poisoned = with_nan(train, index)
    callback = lp.SusceptibilityCallback(
        config,
        [ProbeLoss("probe_B", held_b), LLC()],
        probe=train,
        probe_indices=sorted(probe),
        loss_batches=2,
        every_n_train_steps=10,
        dataloader=DataLoader(poisoned, batch_size=32),
        progress=False,
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    with pytest.warns(NonFiniteLossWarning) as caught:
        _fit(tmp_path, callback, steps=20, logger=logger)
    first, second = callback.history
    assert first["skipped"] == 1.0 and first["step"] == 10
    messages = [str(w.message) for w in caught]
    assert any("skipped its estimate at step 10" in m and f"samples [{index}]" in m for m in messages)
    assert "skipped" not in second
    dropped = chains_drawing(poisoned, config, run=1000, index=index)
    assert second["diverged_chains"] == float(dropped.sum())
    assert torch.isfinite(callback.latest.matrix).all()
    scalars = nan_free_scalars(logger.log_dir)
    assert len(scalars["susceptibility/mu/probe_B"]) == 1  # step 20 only
    assert all(math.isfinite(v) for values in scalars.values() for v in values)


def test_patterning_callback_keeps_the_weights_when_its_estimates_are_skipped(tmp_path):
    """The NaN sample is one of the probe samples (columns of χ): every estimate is skipped, the sampler's
    weights stay at the natural mix and are never set."""
    train, held_b, _ = sources(0)
    callback = lp.PatterningCallback(
        CONFIG,
        [ProbeLoss("probe_B", held_b)],
        lp.targets.Shift({"probe_B": -1.0}),
        every_n_train_steps=10,
        probe_size=200,
        dataloader=DataLoader(with_nan(train, 0), batch_size=32),  # sample 0 is always probed
        progress=False,
    )
    with pytest.warns(NonFiniteLossWarning, match=r"skipped its estimate .* samples \[0\]"):
        data = _fit(tmp_path, callback)
    assert [h["skipped"] for h in callback.history] == [1.0, 1.0, 1.0]
    assert [h["active"] for h in callback.history] == [0.0, 0.0, 0.0]
    assert data.sampler.version == 0
    assert torch.allclose(data.weights, torch.tensor([1.5, 0.5], dtype=torch.float64))


def test_patterning_callback_with_a_nan_sample_drawn_by_some_chains_still_updates(tmp_path):
    train, held_b, _ = sources(0)
    poisoned = with_nan(train)
    callback = lp.PatterningCallback(
        CONFIG,
        [ProbeLoss("probe_B", held_b)],
        lp.targets.Shift({"probe_B": -1.0}),
        every_n_train_steps=10,
        probe_size=200,
        dataloader=DataLoader(poisoned, batch_size=32),
        noise_gate=None,  # every estimate updates (the gate is tested in test_patterning_gate.py)
        progress=False,
    )
    with pytest.warns(NonFiniteLossWarning, match=rf"from samples \[{NAN_SAMPLE}\]"):
        data = _fit(tmp_path, callback)
    dropped = [float(chains_drawing(poisoned, CONFIG, run * 1000).sum()) for run in range(3)]
    assert [h["diverged_chains"] for h in callback.history] == dropped
    assert any(d > 0 for d in dropped) and all(d < CONFIG.num_chains for d in dropped)
    assert all(h["active"] == 1.0 for h in callback.history)
    assert data.sampler.version == 3


class _PoisonWeights(L.Callback):
    """Sets the model's bias to NaN after step ``step`` (training itself diverging)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.linear.bias.fill_(float("nan"))


def test_non_finite_weights_skip_the_estimate_with_a_warning_naming_the_weights(tmp_path):
    callback = lp.LLCCallback(CONFIG, every_n_train_steps=10, progress=False)
    train, _, labels = sources(0)
    L.seed_everything(0, verbose=False)
    data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
    match = r"step 20: .*weights are non-finite: \[linear\.weight, linear\.bias\]"
    with pytest.warns(NonFiniteLossWarning, match=match):
        _trainer(tmp_path, [_PoisonWeights(15), callback], 30).fit(LinearRegressor(), datamodule=data)
    assert [h.get("skipped", 0.0) for h in callback.history] == [0.0, 1.0, 1.0]
    assert math.isfinite(callback.history[0]["mean"])
