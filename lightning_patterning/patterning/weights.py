"""From an intervention ``dh`` to sampling weights ``ρ`` (mean 1 over the data axis;
docs/concepts/patterning.md).

    s   = dh − mean(dh)                        (mass is preserved)
    ŝ   = s / max|s|                           (the linear theory gives the direction, not the size)
    multiplicative:  ρ' ∝ ρ · exp(α·ŝ)          (exponentiated gradient; always positive)
    additive:        ρ' = ρ + α·ŝ, then ρ' ≥ floor
    bounded change:  ρ'/ρ ∈ [1/(1+max_change), 1+max_change]
    smoothing:       ρ' ← (1 − η)·ρ' + η        (toward uniform)
    renormalize:     mean(ρ') = 1

``α`` (``strength``) is the largest log-change (multiplicative) or the largest change in mean-1 units
(additive) of one update; it does not depend on nβ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

UpdateRule = Literal["multiplicative", "additive"]


@dataclass(frozen=True)
class WeightUpdate:
    """Settings of the weight update (see the module docstring for the formulas)."""

    strength: float = 0.5
    rule: UpdateRule = "multiplicative"
    floor: float = 0.05  # additive rule only
    max_change: float | None = None
    smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.strength) and self.strength > 0):
            raise ValueError(f"strength must be a finite number > 0, got {self.strength!r}")
        if self.rule not in ("multiplicative", "additive"):
            raise ValueError(f"rule must be 'multiplicative' or 'additive', got {self.rule!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1) (a fraction of the mean weight), got {self.floor!r}")
        if self.max_change is not None and not self.max_change > 0:
            raise ValueError(f"max_change must be None or > 0, got {self.max_change!r}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing!r}")

    def apply(self, weights: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """New mean-1 weights from the current ``weights`` and the intervention ``dh`` (same length), plus
        diagnostics: effective sample size fraction, fraction at the floor, min/max weight."""
        if weights.shape != dh.shape:
            raise ValueError(
                f"dh has shape {list(dh.shape)}, expected the weights' shape {list(weights.shape)}"
            )
        current = weights.double() / weights.double().mean()
        s = dh.double() - dh.double().mean()
        scale = float(s.abs().max())
        step = s / scale if scale > 0 else torch.zeros_like(s)
        if self.rule == "multiplicative":
            proposed = current * torch.exp(self.strength * step)
        else:
            proposed = current + self.strength * step
        if self.max_change is not None:
            ratio = (proposed / current).clamp(1 / (1 + self.max_change), 1 + self.max_change)
            proposed = current * ratio
        proposed = (1 - self.smoothing) * proposed + self.smoothing
        proposed = proposed / proposed.mean()
        at_floor = torch.zeros_like(proposed, dtype=torch.bool)
        if self.rule == "additive":  # multiplicative weights stay positive and keep their ratios
            at_floor = proposed <= self.floor
            proposed = torch.where(at_floor, torch.full_like(proposed, self.floor), proposed)
            proposed = proposed / proposed.mean()
        return proposed.to(weights.dtype), {
            "ess_fraction": float(proposed.sum() ** 2 / (proposed.square().sum() * len(proposed))),
            "floor_fraction": float(at_floor.double().mean()),
            "min_weight": float(proposed.min()),
            "max_weight": float(proposed.max()),
        }


def sampling_summary(weights: torch.Tensor, group_sizes: torch.Tensor | None = None) -> dict[str, float]:
    """How far the training draw is from the natural mix (every training sample equally likely).

    With per-sample weights ``P(i) = w_i/Σw``; with per-group weights (a group's weight is its total mass,
    shared by its ``n_g`` members) ``P(i) = m_g/n_g``. Returns ``ess_fraction``, the effective sample size
    of the draw as a fraction of the ``N`` training samples, ``1/(N·Σ_i P(i)²)`` (Kish): 1 at the natural
    mix, ``1/N`` when one sample takes everything; and ``min_mass``, the smallest probability mass of a
    column (group or sample).
    """
    mass = weights.double() / weights.double().sum()
    if group_sizes is None:
        squares, total = float(mass.square().sum()), len(mass)
    else:
        sizes = group_sizes.double()
        present = sizes > 0
        squares, total = float((mass[present].square() / sizes[present]).sum()), int(sizes.sum())
    return {"ess_fraction": 1.0 / (total * squares), "min_mass": float(mass.min())}
