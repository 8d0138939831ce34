"""PatterningCallback end to end on a problem with a known answer, plus resume, DDP and bad input."""

from __future__ import annotations

import json
import statistics

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_patterning as lp
from lightning_patterning.observables import LLC, ProbeLoss
from tests.patterning_problem import SIZES, LinearRegressor, MixtureData, patterning_callback, sources, train

SEEDS = range(5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shift_toward_probe_b_moves_weight_to_b_and_lowers_its_loss(tmp_path):
    """Paired by seed (same init, batch order and data): −1 on the B-probe loss raises B's mass and lowers
    the probe loss below the baseline's; +1 does the opposite."""
    rows = {
        seed: {
            arm: train(seed, sign, tmp_path=tmp_path)
            for arm, sign in (("baseline", None), ("toward_B", -1.0), ("away_from_B", 1.0))
        }
        for seed in SEEDS
    }
    for seed, row in rows.items():
        print(seed, {arm: {k: round(v, 4) for k, v in r.items()} for arm, r in row.items()})
    base_mass = SIZES[1] / sum(SIZES)
    for row in rows.values():
        assert row["baseline"]["mass_B"] == pytest.approx(base_mass)
        assert row["toward_B"]["mass_B"] > base_mass > row["away_from_B"]["mass_B"]
        assert (
            row["toward_B"]["probe_loss"] < row["baseline"]["probe_loss"] < row["away_from_B"]["probe_loss"]
        )
    ratio = statistics.median(
        r["toward_B"]["probe_loss"] / r["baseline"]["probe_loss"] for r in rows.values()
    )
    assert ratio < 0.5


def _trainer(tmp_path, callbacks, steps, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _setup(seed: int = 0):
    train_data, held_out_b, labels = sources(seed)
    L.seed_everything(seed, verbose=False)
    model = LinearRegressor()
    data = lp.PatterningDataModule(MixtureData(train_data), groups=labels, seed=seed)
    data.set_weights(torch.tensor(SIZES, dtype=torch.float64))
    return model, data, held_out_b


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_resume_mid_training_ends_with_the_same_weights_and_model(tmp_path):
    model, data, held = _setup()
    full = patterning_callback(held, -1.0)
    _trainer(tmp_path / "full", [full], 50).fit(model, datamodule=data)
    full_weights, full_params = data.weights.clone(), [p.detach().clone() for p in model.parameters()]

    model, data, held = _setup()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=25, save_top_k=-1)
    crashing = [patterning_callback(held, -1.0), checkpoint, _CrashAt(37)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(tmp_path / "crash", crashing, 50, enable_checkpointing=True).fit(model, datamodule=data)

    model, data, held = _setup()
    resumed = patterning_callback(held, -1.0)
    ckpt = next((tmp_path / "ckpt").glob("*step=25.ckpt"))
    _trainer(tmp_path / "resume", [resumed], 50).fit(model, datamodule=data, ckpt_path=ckpt)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    assert torch.equal(data.weights, full_weights)
    for a, b in zip(model.parameters(), full_params, strict=True):
        assert torch.equal(a.detach(), b)


class _DumpWeights(L.Callback):
    """After every patterning update, each rank appends the weights it holds to ``rank{r}.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        callback = next(c for c in trainer.callbacks if isinstance(c, lp.PatterningCallback))
        if callback.history and callback.history[-1]["step"] == trainer.global_step:
            self.seen.append(trainer.datamodule.weights.tolist())

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(self.seen, handle)


def test_ddp_ranks_hold_the_same_weights_after_every_update(tmp_path):
    model, data, held = _setup()
    callbacks = [patterning_callback(held, -1.0, every=5), _DumpWeights(str(tmp_path))]
    _trainer(tmp_path, callbacks, 15, strategy="ddp_spawn", devices=2).fit(model, datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]) == 3
    assert ranks[0] == ranks[1]
    assert ranks[0][-1][1] > ranks[0][0][1]  # B's weight keeps rising


def test_target_naming_an_unknown_observable_fails_at_construction():
    with pytest.raises(ValueError, match=r"names observable\(s\) \['ood'\] that no observable defines"):
        lp.PatterningCallback(
            observables=[LLC()], target=lp.targets.Shift({"ood": -1.0}), every_n_train_steps=5
        )


def test_training_without_a_weighted_sampler_fails_clearly(tmp_path):
    train_data, held, _ = sources(0)
    callback = lp.PatterningCallback(
        observables=[ProbeLoss("probe_B", held)],
        target=lp.targets.Shift({"probe_B": -1.0}),
        every_n_train_steps=5,
    )
    with pytest.raises(MisconfigurationException, match="WeightedDistributedSampler"):
        _trainer(tmp_path, [callback], 5).fit(LinearRegressor(), datamodule=MixtureData(train_data))


def test_goal_target_leaves_weights_alone_once_reached(tmp_path):
    model, data, held = _setup()
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=2, num_draws=20, batch_size=32)
    reached = lp.targets.Goal({"probe_B": 0.0}, tolerance=1e6)
    callback = lp.PatterningCallback(
        config, [ProbeLoss("probe_B", held)], reached, every_n_train_steps=10, probe_size=200, progress=False
    )
    _trainer(tmp_path, [callback], 30).fit(model, datamodule=data)
    assert [h["active"] for h in callback.history] == [0.0, 0.0, 0.0]
    weights = data.weights.double()
    assert torch.allclose(weights / weights.sum(), torch.tensor(SIZES).double() / sum(SIZES), atol=1e-6)


def test_goal_is_reached_when_crossed_or_within_tolerance():
    def chi(mu: float) -> lp.Susceptibilities:
        return lp.Susceptibilities(
            matrix=torch.ones(1, 3),
            stderr=torch.zeros(1, 3),
            mu=torch.tensor([mu]),
            names=["a"],
            kinds=["LLC"],
            sample_ids=torch.arange(3),
            group_names=None,
            group_index=None,
            nbeta=1.0,
            center_loss=0.0,
            diverged_chains={},
            config={},
        )

    goal = lp.targets.Goal({"a": 1.0}, tolerance=0.1)
    _, dmu = goal.resolve(chi(3.0))
    assert dmu.tolist() == [-2.0] and not goal.reached(chi(3.0))
    assert goal.reached(chi(1.05)) and goal.reached(chi(0.5)) and not goal.reached(chi(1.2))


def test_an_estimate_whose_chains_all_diverged_leaves_the_weights_alone(tmp_path):
    """Every chain flagged as diverged (a threshold just above L(w*)) gives a non-finite χ: the callback
    warns, keeps the weights and training runs to the end."""
    model, data, held = _setup()
    config = lp.SGLDConfig(
        lr=1e-3,
        nbeta=50.0,
        localization=100.0,
        num_chains=2,
        num_draws=20,
        batch_size=32,
        divergence_factor=1.0001,
        divergence_floor=1e-9,
    )
    callback = lp.PatterningCallback(
        config,
        [ProbeLoss("probe_B", held)],
        lp.targets.Shift({"probe_B": -1.0}),
        every_n_train_steps=10,
        probe_size=200,
        progress=False,
    )
    with pytest.warns(UserWarning, match="not finite"):
        _trainer(tmp_path, [callback], 30).fit(model, datamodule=data)
    assert [h["active"] for h in callback.history] == [0.0, 0.0, 0.0]
    assert all(h["diverged_chains"] == 2.0 for h in callback.history)
    weights = data.weights.double()
    assert torch.allclose(weights / weights.sum(), torch.tensor(SIZES).double() / sum(SIZES), atol=1e-6)


def test_goal_initial_sign_is_saved_in_the_checkpoint_and_restored_on_resume(tmp_path):
    """The goal is reached once μ crosses it; which side μ started on must survive a resume, or a resumed
    run that has crossed would take the crossing for a new gap and push μ back."""
    model, data, held = _setup()
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=2, num_draws=10, batch_size=32)

    def callback() -> lp.PatterningCallback:
        goal = lp.targets.Goal({"probe_B": -5.0})  # far below μ: the first gap is negative
        return lp.PatterningCallback(
            config, [ProbeLoss("probe_B", held)], goal, every_n_train_steps=5, probe_size=200, progress=False
        )

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = callback()
    _trainer(tmp_path / "run", [first, checkpoint], 5, enable_checkpointing=True).fit(model, datamodule=data)
    assert first.target.state_dict() == {"initial_sign": {"probe_B": -1.0}}
    saved = torch.load(next((tmp_path / "ckpt").glob("*step=5.ckpt")), weights_only=False)["callbacks"]
    assert [s["target"] for s in saved.values() if "target" in s] == [{"initial_sign": {"probe_B": -1.0}}]

    model, data, held = _setup()
    resumed = callback()
    ckpt = next((tmp_path / "ckpt").glob("*step=5.ckpt"))
    _trainer(tmp_path / "resume", [resumed], 5).fit(model, datamodule=data, ckpt_path=ckpt)
    assert resumed.target.state_dict() == {"initial_sign": {"probe_B": -1.0}}

    def chi(mu: float) -> lp.Susceptibilities:
        return lp.Susceptibilities(
            torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([mu]), ["probe_B"], ["ProbeLoss"],
            torch.arange(2), None, None, 1.0, 0.0, {}, {},
        )  # fmt: skip

    assert resumed.target.reached(chi(-6.0))  # crossed from above: reached
    assert not callback().target.reached(chi(-6.0))  # without the saved sign it would not be
