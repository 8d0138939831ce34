"""The noise gate: scale a patterning update by how clearly ``χ̂`` responds along the target at all.

``χ̂`` is a Monte-Carlo estimate with a standard error per entry. The solve ``dh = χ̂†·dμ`` always finds
*some* re-weighting, and the weight update normalizes its size away (``s / max|s|``), so without a gate a
``χ̂`` that is pure noise moves the weights by the full strength at every update (docs/concepts/patterning.md).

The predicted change along the solved direction cannot tell signal from noise by itself: the solve picks
the direction in which ``χ̂`` is largest, so for pure noise with ``N`` columns ``|dμ_pred|`` comes out about
``√N`` of its own standard errors. The gate therefore tests the response of the target direction before
solving. With ``t̂ = dμ_target/‖dμ_target‖`` the response of each column is ``r_z = Σ_i t̂_i·χ̂_iz`` with
standard error ``e_z = √(Σ_i t̂_i²·stderr_iz²)`` (entries' errors treated as independent). A re-weighting
that preserves mass only sees ``r`` up to a constant, so the statistic is

    W = Σ_z ((r_z − r̄)/e_z)²          r̄ = Σ_z (r_z/e_z²) / Σ_z (1/e_z²)

which is ``χ²`` with ``N − 1`` degrees of freedom when every column responds alike (no usable signal)
and grows with the signal otherwise. The standard errors are themselves estimates from ``C`` chains
(jackknife, ``ν = C − 1`` degrees of freedom, shared by every column), so ``W/(N − 1)`` is referred to
the ``F(N − 1, ν)`` distribution (``χ²_{N−1}/(N − 1)`` when ``ν`` is not given): with 4 chains a
difference of 2 standard errors is common noise. Its tail probability, as a standard-normal quantile, is
the signal-to-noise ratio ``snr = Φ⁻¹(1 − Q(W))``: about ``N(0, 1)`` under pure noise for any ``N``.
The update is scaled by

    scale = clip((snr − k)/k, 0, 1)         0 below k, full strength from 2k on

so with the default ``k = 2`` pure noise gives a non-zero step in 2.3 % of updates and a full one in
0.003 %. Standard errors that are all zero are read as exact (``scale = 1``); errors that cannot be
assessed (non-finite, e.g. from fewer than two chains, or ``ν < 1``) give no step (``scale = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_SF_FLOOR = 1e-300  # tail probabilities below this give snr ≈ 37


@dataclass(frozen=True)
class GateResult:
    """The gate's decision and the numbers behind it.

    Attributes:
        scale: factor in ``[0, 1]`` applied to the update's strength.
        snr: the signal-to-noise ratio (a standard-normal quantile; ``inf`` when not gated for lack of
            standard errors, ``nan`` with fewer than two columns).
        statistic: ``W``. dof: its degrees of freedom ``N − 1``.
        gated: whether standard errors were available (False: ``scale`` is 1 by convention).
    """

    scale: float
    snr: float
    statistic: float
    dof: int
    gated: bool

    def info(self) -> dict[str, float]:
        """Flat numbers for logging: ``gate`` (the scale) and ``snr``."""
        return {"gate": self.scale, "snr": self.snr}


def noise_gate(
    chi: torch.Tensor,
    stderr: torch.Tensor,
    target: torch.Tensor,
    k: float = 2.0,
    dof: int | None = None,
) -> GateResult:
    """The scale of a patterning update from the response of ``target`` in ``chi`` and its errors.

    Args:
        chi: ``[observables, N]`` the matrix the solve inverts.
        stderr: ``[observables, N]`` standard errors of ``chi``'s entries, in the same units.
        target: ``[observables]`` the desired change ``dμ``.
        k: the threshold on the signal-to-noise ratio (> 0): no step below ``k``, full strength at ``2k``.
        dof: degrees of freedom of the standard errors (chains − 1 for a jackknife over chains); ``None``:
            treat them as exact.

    Returns:
        A ``GateResult``; see the module docstring for the rule.
    """
    if chi.ndim != 2 or stderr.shape != chi.shape:
        raise ValueError(
            f"chi and stderr must be [observables, N] matrices of one shape, got {list(chi.shape)} and "
            f"{list(stderr.shape)}"
        )
    if target.shape != (chi.shape[0],):
        raise ValueError(f"target must have shape [{chi.shape[0]}], got {list(target.shape)}")
    if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
        raise ValueError(f"k must be a finite number > 0, got {k!r}")
    columns = chi.shape[1]
    norm = float(target.double().norm())
    if columns < 2 or norm == 0.0:  # no mass-preserving change, or nothing to do
        return GateResult(0.0, math.nan, math.nan, max(columns - 1, 0), True)
    errors = stderr.double()
    if not bool(torch.isfinite(errors).all()) or (dof is not None and dof < 1):
        return GateResult(0.0, math.nan, math.nan, columns - 1, True)
    if not bool((errors > 0).any()):
        return GateResult(1.0, math.inf, math.nan, columns - 1, False)
    direction = target.double() / norm
    response = direction @ chi.double()
    error = (direction.square() @ errors.square()).sqrt()
    error = error.clamp_min(float(error.max()) * 1e-6)
    precision = error.pow(-2)
    centre = float((response * precision).sum() / precision.sum())
    statistic = float(((response - centre) / error).square().sum())
    df = columns - 1
    if dof is None:
        tail = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(statistic / 2.0)))
    else:  # P(F(df, dof) > W/df) = I_{dof/(dof + W)}(dof/2, df/2)
        tail = regularized_beta(dof / 2.0, df / 2.0, dof / (dof + statistic))
    snr = float(-torch.special.ndtri(torch.tensor(max(tail, _SF_FLOOR), dtype=torch.float64)))
    scale = min(max((snr - k) / k, 0.0), 1.0)
    return GateResult(scale, snr, statistic, df, True)


def regularized_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` (continued fraction, modified Lentz;
    Press et al., "Numerical Recipes", §6.4), accurate to ~1e-12 for the ``a, b ≤ 10⁴`` used here."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x!r}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast below this point
        return 1.0 - regularized_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - _log_beta(a, b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
