"""The minimum-norm data intervention for a desired change of the structural coordinates.

Linear response ``dμ = χ·dh`` (SCIENCE.md §4); the minimum-norm ``dh`` that produces ``dμ_target`` is

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
