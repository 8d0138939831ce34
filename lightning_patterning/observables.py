"""Observables φ(w) whose posterior means μ = ⟨φ⟩ are the structural coordinates
(docs/concepts/susceptibilities.md).

Each observable is a small class with typed ``__init__`` arguments, so LightningCLI YAML can build it
(``class_path: lightning_patterning.observables.ProbeLoss``); none needs a lambda.

| observable   | φ(w)                                                    | chains                      |
|--------------|---------------------------------------------------------|-----------------------------|
| ``ProbeLoss`` | mean per-sample loss on a probe set P                   | unrestricted                |
| ``LLC``       | ``nβ·(L(w) − L(w*))`` on the fixed loss batches          | unrestricted                |
| ``Restricted``| ``L(w) − L(w*)`` when only component C moves             | one restricted to C (+ full) |
| ``Custom``    | any scalar function of the module                        | unrestricted                |
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ObservableFn = Callable[[nn.Module], torch.Tensor]


class Observable:
    """Base class: a named function of the weights. ``restricted`` observables need their own chains."""

    restricted: bool = False

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"observable name must be a non-empty string without '/', got {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ProbeLoss(Observable):
    """``φ(w)`` = mean per-sample loss of the module on ``data`` (e.g. out-of-distribution inputs).

    Args:
        name: observable name (row label of the susceptibility matrix, key of targets).
        data: a map-style Dataset or a DataLoader (its dataset and ``collate_fn`` are used).
        max_samples: evaluate only the first this many samples at each draw (``None``: all).
    """

    def __init__(self, name: str, data: Dataset | DataLoader, max_samples: int | None = None) -> None:
        super().__init__(name)
        if not isinstance(data, (Dataset, DataLoader)):
            raise TypeError(
                f"ProbeLoss({name!r}): data must be a Dataset or DataLoader, got {type(data).__name__}"
            )
        if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
            raise ValueError(
                f"ProbeLoss({name!r}): max_samples must be None or an int >= 1, got {max_samples!r}"
            )
        self.data = data
        self.max_samples = max_samples


class LLC(Observable):
    """``φ(w) = nβ·(L(w) − L(w*))``, so ``⟨φ⟩`` is the LLC and ``χ(LLC) = −nβ·Cov[L, ℓ_z − L]``.

    ``L`` is the loss on the estimator's fixed loss batches (paired with ``w*`` on the same batches).
    """

    def __init__(self, name: str = "llc") -> None:
        super().__init__(name)


class Restricted(Observable):
    """A weight-restricted component C: ``φ = L(w) − L(w*)`` on a chain where only C moves.

    Estimated with devinterp's two-chain estimator (a chain restricted to C plus the unrestricted one);
    the row equals the true susceptibility times an unknown positive factor that depends on C only, so
    compare components after standardizing rows. ``μ`` is the restricted LLC ``λ̂_C``.

    Args:
        name: component name, e.g. ``"l0h3"``.
        params: glob patterns of parameter names that belong to C (whole parameters).
        masks: optional per-entry masks ``{parameter name: 0/1 tensor}`` (e.g. one head's rows of a fused
            projection); combined with ``params``.
    """

    restricted = True

    def __init__(
        self, name: str, params: Sequence[str] | None = None, masks: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        super().__init__(name)
        if isinstance(params, str):
            params = [params]
        if not params and not masks:
            raise ValueError(f"Restricted({name!r}): give params (glob patterns) and/or masks")
        self.params = list(params or [])
        self.masks = dict(masks or {})


class Custom(Observable):
    """``φ(w) = fn(module)``, any scalar function of the module (a weight norm, an attention score...).

    Args:
        name: observable name.
        fn: a callable ``fn(module) -> scalar Tensor``, or its import path ``"package.module.function"``
            (for YAML configs).
    """

    def __init__(self, name: str, fn: ObservableFn | str) -> None:
        super().__init__(name)
        if isinstance(fn, str):
            fn = _import_callable(fn, f"Custom({name!r}): fn")
        if not callable(fn):
            raise TypeError(f"Custom({name!r}): fn must be callable fn(module) -> scalar, got {fn!r}")
        self.fn: ObservableFn = fn


def _import_callable(path: str, argument: str) -> ObservableFn:
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{argument} must be an import path 'package.module.function', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{argument}: cannot import {path!r} ({error})") from error


def check_observables(observables: Sequence[Observable]) -> list[Observable]:
    """Validate a list of observables: right types, at least one, unique names."""
    observables = list(observables)
    if not observables:
        raise ValueError("observables must hold at least one observable")
    seen: set[str] = set()
    for observable in observables:
        if not isinstance(observable, Observable):
            raise TypeError(
                f"observables must be lp.observables.Observable instances, got {type(observable).__name__}"
            )
        if observable.name in seen:
            raise ValueError(f"observables: the name {observable.name!r} is used twice; names must be unique")
        seen.add(observable.name)
    return observables
