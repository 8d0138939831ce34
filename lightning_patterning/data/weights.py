"""Sampling weights: validation, groups, and the per-sample probabilities they define.

Per-sample weights ``w`` (one per sample) give ``P(i) = w_i / Σ_j w_j``.

Per-group weights (``groups[i] = g(i) ∈ {0, …, G−1}``, one weight per group) give each group its
weight as *total mass*, shared equally by its members (the natural reading of "the weight of a data
source"):

    P(i) = (w_{g(i)} / n_{g(i)}) / Σ_{g : n_g > 0} w_g          n_g = number of samples in group g

so a group of 10 samples and a group of 1000 samples with equal weights are each drawn half the time.
Groups with no samples carry no mass. The helpers here also provide the two draws the sampler uses:
inverse-CDF draws with replacement and Efraimidis–Spirakis orders without replacement (sort by
``E_i / w_i``, ``E_i ~ Exp(1)``; Efraimidis & Spirakis 2006, "Weighted random sampling with a reservoir").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "cumulative",
    "draw_with_replacement",
    "draw_without_replacement",
    "per_sample_weights",
    "validate_groups",
    "validate_weights",
]


def validate_weights(weights: Tensor | Sequence[float], length: int, name: str = "weights") -> Tensor:
    """A validated float64 copy of ``weights``.

    Args:
        weights: one non-negative finite number per sample (or per group).
        length: the required number of entries.
        name: the argument name used in error messages.

    Returns:
        A new 1-D float64 CPU tensor (never a view of the input).

    Raises:
        ValueError: not 1-D numbers, wrong length, NaN/inf, negative entries, or a sum that is not > 0.
    """
    allowed = f"{name} must be a 1-D sequence of {length} finite numbers >= 0 with a sum > 0"
    try:
        if isinstance(weights, Tensor):
            tensor = weights.detach().to(device="cpu", dtype=torch.float64).clone()
        else:
            tensor = torch.tensor(weights, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{allowed}; got {type(weights).__name__} that is not numeric ({err})") from err
    if tensor.ndim != 1 or tensor.numel() != length:
        raise ValueError(f"{allowed}; got shape {list(tensor.shape)}")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise ValueError(f"{allowed}; got NaN or inf at positions {_first(bad)}")
    negative = tensor < 0
    if negative.any():
        raise ValueError(f"{allowed}; got negative entries at positions {_first(negative)}")
    if not tensor.sum() > 0:
        raise ValueError(f"{allowed}; got all zeros")
    return tensor


def validate_groups(groups: Tensor | Sequence[int], length: int) -> Tensor:
    """A validated int64 copy of ``groups``: one group id in ``0..G−1`` per sample.

    Raises:
        ValueError: not 1-D integers ``>= 0`` of the given length.
    """
    allowed = f"groups must be a 1-D sequence of {length} integer group ids >= 0 (one per sample)"
    try:
        tensor = torch.as_tensor(groups).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{allowed}; got {type(groups).__name__} ({err})") from err
    if tensor.ndim != 1 or tensor.numel() != length:
        raise ValueError(f"{allowed}; got shape {list(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{allowed}; got dtype {tensor.dtype}")
    tensor = tensor.to(torch.int64).clone()
    if length and tensor.min() < 0:
        raise ValueError(f"{allowed}; got negative ids at positions {_first(tensor < 0)}")
    return tensor


def per_sample_weights(weights: Tensor, groups: Tensor | None, counts: Tensor | None) -> Tensor:
    """Unnormalized per-sample probabilities: ``weights`` itself, or ``w_{g(i)} / n_{g(i)}`` with groups.

    Raises:
        ValueError: all the mass sits on groups without samples.
    """
    if groups is None or counts is None:
        return weights
    probs = weights[groups] / counts[groups].to(torch.float64)
    if not probs.sum() > 0:
        raise ValueError(
            "weights put all their mass on groups that have no samples; give a non-empty group > 0"
        )
    return probs


def cumulative(probs: Tensor) -> tuple[Tensor, int]:
    """The CDF of ``probs`` and the last index with positive weight (for :func:`draw_with_replacement`)."""
    return torch.cumsum(probs, dim=0), int(torch.nonzero(probs > 0)[-1])


def draw_with_replacement(cdf: tuple[Tensor, int], count: int, generator: torch.Generator) -> Tensor:
    """``count`` i.i.d. indices with ``P(i) ∝ probs[i]`` by inverse CDF, given ``cumulative(probs)``.

    Any number of categories (``torch.multinomial`` stops at 2^24); zero weights are never drawn.
    """
    values, last_positive = cdf
    u = torch.rand(count, generator=generator, dtype=torch.float64) * values[-1]
    return torch.searchsorted(values, u, right=True).clamp_(max=last_positive)


def draw_without_replacement(probs: Tensor, available: Tensor, generator: torch.Generator) -> Tensor:
    """An order of the available positive-weight indices: sorted by ``E_i / probs_i``, ``E_i ~ Exp(1)``.

    The first element is ``i`` with probability ``probs_i / Σ probs`` (over available ``i``), the next
    one the same over the rest, and so on (successive sampling without replacement).
    """
    keys = torch.empty(probs.numel(), dtype=torch.float64).exponential_(generator=generator) / probs
    candidates = torch.nonzero(available & (probs > 0)).squeeze(1)
    return candidates[torch.argsort(keys[candidates], stable=True)]


def _first(mask: Tensor, limit: int = 5) -> list[int]:
    return torch.nonzero(mask).flatten()[:limit].tolist()
