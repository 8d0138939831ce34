"""The noise gate: no step while χ̂ does not respond to the target beyond its standard errors.

The must-show: a χ that is pure noise (an observable the data cannot move) leaves the weights within one
full-strength step of where they started after 10 updates, where the ungated rule random-walks away.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

import lightning_patterning as lp
from lightning_patterning.observables import Custom, ProbeLoss
from lightning_patterning.patterning.gate import noise_gate, regularized_beta
from tests.patterning_problem import SIZES, LinearRegressor, MixtureData, sources

STRENGTH = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the rule


def test_regularized_beta_matches_known_tail_probabilities():
    # two-sided p of Student's t: P(|t_ν| > t) = I_{ν/(ν+t²)}(ν/2, 1/2)
    assert regularized_beta(1.5, 0.5, 3 / (3 + 2.0**2)) == pytest.approx(0.139326, abs=1e-6)  # ν=3, t=2
    assert regularized_beta(0.5, 0.5, 1 / (1 + 1.0)) == pytest.approx(0.5, abs=1e-12)  # Cauchy, t=1
    assert regularized_beta(5e5, 0.5, 1e6 / (1e6 + 4.0)) == pytest.approx(0.0455003, abs=1e-6)  # ≈ normal
    assert regularized_beta(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # a polynomial case


@pytest.mark.parametrize(("columns", "dof"), [(2, None), (30, None), (30, 7)])
def test_pure_noise_passes_the_gate_at_about_the_stated_rate(columns, dof):
    """χ̂ = common offset + noise of the stated size: a non-zero step in ~2.3 % of draws (P(Z > 2))."""
    generator = torch.Generator().manual_seed(columns)
    trials, passed = 4000, 0
    stderr = torch.rand(2, columns, generator=generator) + 0.5
    for _ in range(trials):
        noise = torch.randn(2, columns, generator=generator)
        if dof is not None:  # errors estimated from dof + 1 chains: the noise is Student-t relative to them
            chi2 = torch.randn(dof, generator=generator).square().sum() / dof
            noise = noise / chi2.sqrt()
        chi = 3.0 + stderr * noise
        passed += noise_gate(chi, stderr, torch.tensor([1.0, -0.5]), dof=dof).scale > 0
    rate = passed / trials
    assert abs(rate - 0.0228) < 4 * math.sqrt(0.0228 * 0.9772 / trials), rate


def test_a_clear_signal_gets_full_strength_and_a_weak_one_a_partial_step():
    stderr = torch.full((1, 4), 0.1)
    clear = noise_gate(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), stderr, torch.tensor([1.0]), dof=7)
    weak = noise_gate(torch.tensor([[0.0, 0.6, 0.0, 0.6]]), stderr, torch.tensor([1.0]), dof=7)
    assert clear.scale == 1.0 and clear.snr > 4
    assert 0 < weak.scale < 1 and 2 < weak.snr < 4


def test_errors_that_cannot_be_assessed_give_no_step_and_exact_ones_no_gate():
    chi = torch.tensor([[0.0, 1.0, 2.0]])
    assert noise_gate(chi, torch.full((1, 3), math.nan), torch.tensor([1.0])).scale == 0.0
    assert noise_gate(chi, torch.full((1, 3), 0.1), torch.tensor([1.0]), dof=0).scale == 0.0
    exact = noise_gate(chi, torch.zeros(1, 3), torch.tensor([1.0]))
    assert exact.scale == 1.0 and not exact.gated
    with pytest.raises(ValueError, match="k must be"):
        noise_gate(chi, torch.zeros(1, 3), torch.tensor([1.0]), k=0)


# ---------------------------------------------------------------------------------------------- in training


class WithUnusedParameter(LinearRegressor):
    """The two-source regression model plus a parameter no loss depends on: an observable of it cannot be
    moved by re-weighting the data (its χ is 0 for every group; an estimate is pure Monte-Carlo noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(2))


def unused_coordinate(module: nn.Module) -> torch.Tensor:
    return module.unused[0]


def _patterned_log_weights(tmp_path, callback: lp.PatterningCallback, model: L.LightningModule, steps: int):
    train, _, labels = sources(0)
    L.seed_everything(0, verbose=False)
    data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    natural = torch.tensor(SIZES, dtype=torch.float64)
    return (data.weights / data.weights.sum()).log() - (natural / natural.sum()).log()


def _noise_callback(noise_gate: float | None) -> lp.PatterningCallback:
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=4, num_draws=20, batch_size=32)
    return lp.PatterningCallback(
        config,
        [Custom("unused", "tests.test_patterning_gate.unused_coordinate")],
        lp.targets.Shift({"unused": 1.0}),
        strength=STRENGTH,
        noise_gate=noise_gate,
        every_n_train_steps=5,
        progress=False,
    )


def test_pure_noise_chi_leaves_the_weights_within_one_step_after_ten_updates(tmp_path):
    """Bound: after 10 updates no group's log-mass has moved by more than one full-strength step (0.5).
    Without the gate the same estimates walk the weights away by several steps."""
    gated = _noise_callback(noise_gate=2.0)
    moved = _patterned_log_weights(tmp_path / "gated", gated, WithUnusedParameter(), steps=50)
    assert len(gated.history) == 10
    print("gated:", [round(h["snr"], 2) for h in gated.history], moved.tolist())
    assert float(moved.abs().max()) <= STRENGTH
    assert sum(h["active"] for h in gated.history) <= 2

    ungated = _noise_callback(noise_gate=None)
    drifted = _patterned_log_weights(tmp_path / "ungated", ungated, WithUnusedParameter(), steps=50)
    print("ungated:", drifted.tolist())
    assert all(h["active"] == 1.0 for h in ungated.history)
    assert float(drifted.abs().max()) > 2 * STRENGTH


def test_a_real_response_passes_the_gate_with_enough_chains(tmp_path):
    """The two-source problem with 8 chains: lowering the B-probe loss is a real effect; the gated
    updates go through (at least partly) and raise B's mass."""
    _, held_b, _ = sources(0)
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=8, num_draws=20, batch_size=32)
    callback = lp.PatterningCallback(
        config,
        [ProbeLoss("probe_B", held_b)],
        lp.targets.Shift({"probe_B": -1.0}),
        strength=STRENGTH,
        every_n_train_steps=10,
        probe_size=200,
        progress=False,
    )
    moved = _patterned_log_weights(tmp_path, callback, LinearRegressor(), steps=30)
    print([(round(h["snr"], 2), round(h["gate"], 2)) for h in callback.history])
    assert sum(h["gate"] for h in callback.history) > 0.5
    assert float(moved[1]) > 0 > float(moved[0])
