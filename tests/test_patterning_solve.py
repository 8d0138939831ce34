"""The log-weight solve against its first-order definition, checked by finite differences through the
multiplicative weight update (docs/concepts/patterning.md), and the update's treatment of small groups."""

from __future__ import annotations

import pytest
import torch

from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights
from lightning_patterning.patterning.weights import WeightUpdate


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two observables over 12 groups whose masses span two orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    chi = torch.randn(2, 12, generator=g, dtype=torch.float64)
    mass = torch.logspace(-2, 0, 12, dtype=torch.float64)[torch.randperm(12, generator=g)]
    return chi, mass / mass.sum()


def _realized_dmu(chi: torch.Tensor, mass: torch.Tensor, dh: torch.Tensor, strength: float) -> torch.Tensor:
    """``χ·Δm`` after ``WeightUpdate(strength)`` moves group weights ``∝ mass`` along ``dh``."""
    new, _ = WeightUpdate(strength=strength, floor=0.0).apply(mass.clone(), dh)
    return chi @ (new / new.sum() - mass)


def test_log_weight_solve_meets_its_linear_constraints() -> None:
    chi, mass = _problem()
    target = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    delta = solve_log_weights(chi, target, mass)
    centred = chi - (chi @ mass)[:, None]
    torch.testing.assert_close(centred @ (mass * delta), target)
    assert abs(float(mass @ delta)) < 1e-12


def test_multiplicative_update_realizes_the_target_direction_to_first_order() -> None:
    """Finite differences through ``WeightUpdate``: with the log-weight solve the held observable moves by
    O(α²) while the target one moves by O(α); reading ``χ†·dμ`` as a log-weight change leaks into the held
    observable at first order when the masses differ."""
    chi, mass = _problem()
    target = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    for strength in (1e-2, 1e-3):
        ours = _realized_dmu(chi, mass, solve_log_weights(chi, target, mass), strength)
        assert ours[0] < 0
        assert abs(float(ours[1])) < 0.02 * abs(float(ours[0])) * (strength / 1e-2)
        naive = _realized_dmu(chi, mass, solve_intervention(chi, target), strength)
        assert abs(float(naive[1])) > 0.1 * abs(float(naive[0]))


def test_log_weight_solve_with_equal_masses_is_the_centred_pseudo_inverse() -> None:
    chi, _ = _problem(1)
    mass = torch.full((12,), 1 / 12, dtype=torch.float64)
    target = torch.tensor([1.0, -0.5], dtype=torch.float64)
    delta = solve_log_weights(chi, target, mass)
    centred = chi - chi.mean(dim=1, keepdim=True)
    torch.testing.assert_close(delta, 12 * solve_intervention(centred, target))


def test_log_weight_solve_rejects_bad_masses() -> None:
    chi, mass = _problem()
    target = torch.tensor([1.0, 0.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="mass must have shape"):
        solve_log_weights(chi, target, mass[:5])
    with pytest.raises(ValueError, match="mass must be finite"):
        solve_log_weights(chi, target, -mass)


def test_multiplicative_update_keeps_the_ratios_of_small_groups() -> None:
    """Group weights are group masses, so some are far below the mean; the multiplicative rule must move
    every group by exactly ``exp(α·ŝ)`` up to one normalization (no floor lifting the small ones)."""
    mass = torch.tensor([1e-3, 0.2, 0.3, 0.499], dtype=torch.float64)
    dh = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    update = WeightUpdate(strength=0.5)
    new, info = update.apply(mass, dh)
    s = dh - dh.mean()
    ratio = (new / new.mean()) / (mass / mass.mean())
    expected = torch.exp(0.5 * s / s.abs().max())
    torch.testing.assert_close(ratio / ratio[1], expected / expected[1])
    assert info["floor_fraction"] == 0.0
    additive, info = WeightUpdate(strength=0.5, rule="additive", floor=0.05).apply(mass, -dh)
    assert info["floor_fraction"] > 0 and float(additive.min()) > 0  # the additive rule still floors
