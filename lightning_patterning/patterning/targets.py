"""Patterning targets: the desired change ``dμ`` of the structural coordinates (docs/concepts/patterning.md).

Each target turns the latest estimate into the matrix to invert and the right-hand side ``dμ``:

* ``Shift({"ood": -1.0})`` — a fixed shift in observable units (unnamed observables: 0);
* ``Goal({"ood": 0.1}, tolerance=0.01)`` — ``μ_goal − μ(w_t)``, re-measured at every estimate; done once
  every named observable is within ``tolerance`` of its goal or has crossed it;
* ``PrincipalDirection(index=2, sign=+1)`` — ``dμ = ±u_j`` of the row-standardized matrix, for which
  ``χ†u_j = v_j/σ_j``: re-weight the data along principal component ``j``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_patterning.estimators.result import Susceptibilities


class Target:
    """Base class. ``resolve(chi)`` returns ``(matrix to invert [k, N], dμ [k])``; ``errors(chi)`` the
    standard errors of that matrix's entries (for the noise gate)."""

    def check_names(self, names: list[str]) -> None:
        """Raise ``ValueError`` if the target names an observable that is not in ``names``."""

    def resolve(self, chi: Susceptibilities) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def errors(self, chi: Susceptibilities) -> torch.Tensor:
        """Standard errors of the entries of ``resolve(chi)``'s matrix (here: ``chi.stderr``)."""
        return chi.stderr

    def reached(self, chi: Susceptibilities) -> bool:
        """Whether the target is met (then patterning stops adjusting the weights)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What the target remembers between estimates (saved in the callback's checkpoint state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""


class _NamedTarget(Target):
    def __init__(self, values: dict[str, float], what: str) -> None:
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{type(self).__name__} needs a non-empty dict observable name -> {what}")
        for name, value in values.items():
            if not isinstance(name, str):
                raise TypeError(f"{type(self).__name__}: observable names must be strings, got {name!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(
                    f"{type(self).__name__}: {what} for {name!r} must be a finite number, got {value!r}"
                )
        self.values = {name: float(value) for name, value in values.items()}

    def check_names(self, names: list[str]) -> None:
        unknown = [n for n in self.values if n not in names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} names observable(s) {unknown} that no observable defines; "
                f"defined observables: {names}"
            )


class Shift(_NamedTarget):
    """A fixed change ``dμ`` in observable units, e.g. ``Shift({"probe_B": -1.0})``: lower the probe loss."""

    def __init__(self, shifts: dict[str, float]) -> None:
        super().__init__(shifts, "shift")

    def resolve(self, chi: Susceptibilities) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_names(chi.names)
        dmu = torch.tensor([self.values.get(n, 0.0) for n in chi.names], dtype=chi.matrix.dtype)
        return chi.matrix, dmu


class Goal(_NamedTarget):
    """Move observables to goal values: ``dμ = μ_goal − μ(w_t)``, re-measured at each estimate.

    Args:
        goals: observable name → goal value of its posterior mean μ.
        tolerance: a goal counts as reached within this distance (or once μ has crossed it).
    """

    def __init__(self, goals: dict[str, float], tolerance: float = 0.0) -> None:
        super().__init__(goals, "goal")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"Goal: tolerance must be a finite number >= 0, got {tolerance!r}")
        self.tolerance = float(tolerance)
        self._initial_sign: dict[str, float] = {}

    def _gaps(self, chi: Susceptibilities) -> dict[str, float]:
        self.check_names(chi.names)
        return {n: goal - float(chi.mu[chi.names.index(n)]) for n, goal in self.values.items()}

    def resolve(self, chi: Susceptibilities) -> tuple[torch.Tensor, torch.Tensor]:
        gaps = self._gaps(chi)
        for name, gap in gaps.items():
            self._initial_sign.setdefault(name, math.copysign(1.0, gap))
        dmu = torch.tensor([gaps.get(n, 0.0) for n in chi.names], dtype=chi.matrix.dtype)
        return chi.matrix, dmu

    def state_dict(self) -> dict[str, Any]:
        """The sign of each goal's first gap (a goal counts as reached once the gap changes sign)."""
        return {"initial_sign": dict(self._initial_sign)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._initial_sign = {str(k): float(v) for k, v in state.get("initial_sign", {}).items()}

    def reached(self, chi: Susceptibilities) -> bool:
        gaps = self._gaps(chi)
        return all(
            abs(gap) <= self.tolerance or (n in self._initial_sign and gap * self._initial_sign[n] < 0)
            for n, gap in gaps.items()
        )


class PrincipalDirection(Target):
    """``dμ = sign·u_j`` on the row-standardized matrix (``index`` is 1-based: PC2 is ``index=2``)."""

    def __init__(self, index: int = 1, sign: int = 1) -> None:
        if not isinstance(index, int) or index < 1:
            raise ValueError(f"PrincipalDirection: index must be an int >= 1 (1 = PC1), got {index!r}")
        if sign not in (1, -1):
            raise ValueError(f"PrincipalDirection: sign must be +1 or -1, got {sign!r}")
        self.index = index
        self.sign = sign

    def resolve(self, chi: Susceptibilities) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, _ = chi.pca()
        if self.index > int((s > 0).sum()):
            raise ValueError(
                f"PrincipalDirection(index={self.index}): the matrix has only {int((s > 0).sum())} "
                "non-zero principal components"
            )
        return chi.standardized(), self.sign * u[:, self.index - 1]

    def errors(self, chi: Susceptibilities) -> torch.Tensor:
        """``chi.stderr`` in the units of the row-standardized matrix (divided by each row's spread)."""
        centred = chi.matrix - chi.matrix.mean(dim=1, keepdim=True)
        spread = centred.std(dim=1, keepdim=True)
        return torch.where(spread > 0, chi.stderr / spread.clamp_min(torch.finfo(spread.dtype).tiny), 0.0)
