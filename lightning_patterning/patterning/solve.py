"""The minimum-norm data intervention for a desired change of the structural coordinates.

Linear response ``dμ = χ·dh`` (docs/concepts/patterning.md); the minimum-norm ``dh`` that produces
``dμ_target`` is

    dh = χ† · dμ_target

with ``χ†`` the Moore–Penrose pseudo-inverse (least squares when ``dμ_target`` is not reachable).
``χ̂`` is a Monte-Carlo estimate, so small singular values are cut (``rtol``) or damped (``ridge``:
``dh = χᵀ(χχᵀ + ridge·I)⁻¹dμ``). For ``dμ_target = u_j`` (a left singular vector) the solve returns
``v_j/σ_j`` exactly: "re-weight the data along PC j".
"""

from __future__ import annotations

import torch


def solve_intervention(
    chi: torch.Tensor, target: torch.Tensor, rtol: float = 1e-6, ridge: float = 0.0
) -> torch.Tensor:
    """``dh = χ†·dμ`` for ``chi`` [k, N] and ``target`` [k]; returns ``[N]``.

    Args:
        chi: susceptibility matrix (rows: observables, columns: samples or groups).
        target: desired change of each observable.
        rtol: singular values below ``rtol × σ_max`` are treated as zero (rank cut-off).
        ridge: Tikhonov damping ``λ ≥ 0`` (in units of χ², i.e. of σ²); 0 for the plain pseudo-inverse.
    """
    if chi.ndim != 2:
        raise ValueError(f"chi must be a [observables, samples] matrix, got shape {list(chi.shape)}")
    if target.shape != (chi.shape[0],):
        raise ValueError(
            f"target must have shape [{chi.shape[0]}] (one entry per observable), got {list(target.shape)}"
        )
    if not (rtol >= 0 and ridge >= 0):
        raise ValueError(f"rtol and ridge must be >= 0, got rtol={rtol!r}, ridge={ridge!r}")
    if not bool(torch.isfinite(chi).all()) or not bool(torch.isfinite(target).all()):
        raise ValueError("chi and target must be finite")
    u, s, vh = torch.linalg.svd(chi.double(), full_matrices=False)
    keep = s > rtol * s.max() if s.numel() and float(s.max()) > 0 else torch.zeros_like(s, dtype=torch.bool)
    inverse = torch.where(keep, s / (s**2 + ridge), torch.zeros_like(s))
    return (vh.T @ (inverse * (u.T @ target.double()))).to(chi.dtype)


def solve_log_weights(
    chi: torch.Tensor, target: torch.Tensor, mass: torch.Tensor, rtol: float = 1e-6, ridge: float = 0.0
) -> torch.Tensor:
    """The change ``δ`` of the columns' log-weights whose first-order effect is ``dμ_target`` (``[N]``).

    A multiplicative update ``ρ'_g = ρ_g·exp(δ_g)`` (renormalized) changes the columns' probability masses
    ``m`` by ``Δm = M·(δ − 1·mᵀδ)`` to first order (``M = diag(m)``), so ``dμ ∝ χ·Δm = χ̃·M·δ`` with the
    mass-centred matrix ``χ̃ = χ − (χ·m)·1ᵀ``. Among the ``δ`` that produce ``dμ_target`` this returns the
    one of least Fisher norm ``Σ_g m_g·δ_g²`` (the metric of the categorical distribution, i.e. the
    smallest KL change of the sampling distribution):

        δ = M^{-1/2}·(χ̃·M^{1/2})†·dμ_target = χ̃ᵀ·(χ̃·M·χ̃ᵀ)⁻¹·dμ_target

    (the pseudo-inverse with ``rtol``/``ridge`` as in ``solve_intervention``; ``mᵀδ = 0``). Unlike
    ``χ†·dμ`` read as a log-weight change, this holds a control observable (``dμ_i = 0``) fixed when the
    columns' masses differ, e.g. groups of different sizes. Columns of zero mass get ``δ = 0``.

    Args:
        chi: susceptibility matrix [k, N] (columns: groups or samples, per unit of probability mass).
        target: desired change of each observable [k].
        mass: the columns' current probability masses [N] (≥ 0; normalized here).
    """
    if mass.shape != (chi.shape[-1],):
        raise ValueError(f"mass must have shape [{chi.shape[-1]}] (one per column), got {list(mass.shape)}")
    if not bool(torch.isfinite(mass).all()) or bool((mass < 0).any()) or not float(mass.sum()) > 0:
        raise ValueError("mass must be finite, >= 0 and not all zero")
    m = mass.double() / mass.double().sum()
    chi64 = chi.double()
    centred = chi64 - (chi64 @ m)[:, None]
    root = m.sqrt()
    scaled = solve_intervention(centred * root, target.double(), rtol=rtol, ridge=ridge)
    delta = torch.where(root > 0, scaled / torch.where(root > 0, root, torch.ones_like(root)), 0.0)
    return delta.to(chi.dtype)
