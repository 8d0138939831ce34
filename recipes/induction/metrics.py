"""Metrics of induction-circuit formation (Olsson et al., "In-context Learning and Induction Heads", 2022),
each a functional core plus a thin ``torchmetrics.Metric`` that keeps summed state (so DDP ranks add up),
and the onset rule.

* In-context score on a repeated sequence ``[a, a]`` (``a`` of length ``m``): the mean next-token loss on
  the second copy minus that on the first, both over the copy's targets at offsets ``1 … m−1`` (the first
  token of each copy cannot be predicted from the sequence). A model with an induction circuit predicts
  the second copy from the first, so the score falls from about 0 to far below 0.
* Attention to a source position, per head: the mean, over the queries that have a source, of the
  attention weight the query puts on its source key. With source ``t − 1`` it is the previous-token score
  (layer-0 heads); with source ``t − m + 1`` on the second copy of ``[a, a]`` (the token after the current
  token's first occurrence) it is the prefix-matching score (layer-1 heads). A perfect head scores 1.
* Onset: the first evaluation whose in-context score is below a threshold; a run without one is censored
  at its last evaluated step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchmetrics import Metric


def repeat_masks(length: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over the ``length − 1`` next-token losses of a sequence ``[a, a]`` of even ``length = 2m``.

    Loss ``j`` predicts token ``j + 1``. The first copy's targets are tokens ``1 … m−1``, the second
    copy's tokens ``m+1 … 2m−1`` (the same offsets within the copy).

    Returns:
        Boolean masks ``(first, second)``, each ``[length − 1]`` with ``m − 1`` true entries.
    """
    if not isinstance(length, int) or length < 4 or length % 2:
        raise ValueError(f"length must be an even int >= 4, got {length!r}")
    half = length // 2
    target = torch.arange(1, length, device=device)
    first = (target >= 1) & (target < half)
    second = target > half
    return first, second


def in_context_sums(per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed losses on the first and second copies of repeated sequences, and the count per copy.

    Args:
        per_token_loss: next-token losses ``[B, 2m − 1]`` of sequences ``[a, a]`` of length ``2m``.

    Returns:
        ``(first_sum, second_sum, count)`` with ``count = B · (m − 1)`` on each copy.
    """
    if per_token_loss.ndim != 2:
        raise ValueError(f"per_token_loss must be [B, T − 1], got shape {tuple(per_token_loss.shape)}")
    first, second = repeat_masks(per_token_loss.shape[1] + 1, per_token_loss.device)
    count = per_token_loss.shape[0] * int(first.sum())
    return per_token_loss[:, first].sum(), per_token_loss[:, second].sum(), count


def in_context_score(per_token_loss: torch.Tensor) -> torch.Tensor:
    """Mean loss on the second copy minus mean loss on the first (see ``in_context_sums``)."""
    first, second, count = in_context_sums(per_token_loss)
    return (second - first) / count


def previous_token_sources(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Source key of each query for the previous-token score: ``t − 1``, and ``−1`` (none) at ``t = 0``."""
    return torch.arange(length, device=device) - 1


def prefix_matching_sources(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Source key of each query of ``[a, a]`` (even ``length = 2m``) for the prefix-matching score.

    A query at ``t ≥ m`` holds ``a_{t−m}``, whose first occurrence is at ``t − m``; its source is the token
    after that, ``t − m + 1``. Queries in the first copy have none (``−1``).
    """
    if not isinstance(length, int) or length < 4 or length % 2:
        raise ValueError(f"length must be an even int >= 4, got {length!r}")
    half = length // 2
    t = torch.arange(length, device=device)
    return torch.where(t >= half, t - half + 1, torch.full_like(t, -1))


def attention_to_source_sums(pattern: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-head summed attention from each query to its source key, and the number of (sequence, query)
    pairs summed.

    Args:
        pattern: attention ``[B, H, T, T]`` (query, key), rows summing to 1.
        sources: the source key of each query ``[T]`` (``−1``: the query is not counted).

    Returns:
        ``(sums [H], count)``.
    """
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [B, H, T, T], got shape {tuple(pattern.shape)}")
    if sources.shape != (pattern.shape[-1],):
        raise ValueError(f"sources must be [T] = [{pattern.shape[-1]}], got shape {tuple(sources.shape)}")
    queries = torch.nonzero(sources >= 0).squeeze(1)
    weights = pattern[:, :, queries, sources[queries]]  # [B, H, Q]
    return weights.sum(dim=(0, 2)), pattern.shape[0] * queries.numel()


class InContextScore(Metric):
    """Running in-context score (``in_context_score``) over batches of repeated sequences ``[a, a]``.

    ``update(per_token_loss)`` with losses ``[B, 2m − 1]``; ``compute()`` gives the score, and
    ``first_copy_loss()`` / ``second_copy_loss()`` the two means.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("first", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("second", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, per_token_loss: torch.Tensor) -> None:
        first, second, count = in_context_sums(per_token_loss.detach())
        self.first += first.double()
        self.second += second.double()
        self.count += count

    def first_copy_loss(self) -> torch.Tensor:
        return self.first / self.count

    def second_copy_loss(self) -> torch.Tensor:
        return self.second / self.count

    def compute(self) -> torch.Tensor:
        return (self.second - self.first) / self.count


class AttentionToSource(Metric):
    """Running per-head attention to a source key (``attention_to_source_sums``).

    Args:
        sources: ``"previous"`` (previous-token score) or ``"prefix"`` (prefix-matching score on ``[a, a]``).
        n_heads: heads of the attention patterns passed to ``update``.

    ``update(pattern)`` with one layer's pattern ``[B, H, T, T]``; ``compute()`` gives ``[H]``.
    """

    full_state_update = False

    def __init__(self, sources: str, n_heads: int) -> None:
        super().__init__()
        if sources not in ("previous", "prefix"):
            raise ValueError(f"sources must be 'previous' or 'prefix', got {sources!r}")
        if not isinstance(n_heads, int) or n_heads < 1:
            raise ValueError(f"n_heads must be an int >= 1, got {n_heads!r}")
        self.sources = sources
        self.add_state("total", torch.zeros(n_heads, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pattern: torch.Tensor) -> None:
        length = pattern.shape[-1]
        make = previous_token_sources if self.sources == "previous" else prefix_matching_sources
        total, count = attention_to_source_sums(pattern.detach(), make(length, pattern.device))
        self.total += total.double()
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.total / self.count


@dataclass(frozen=True)
class Onset:
    """When a run's in-context score first fell below the threshold.

    Attributes:
        step: the first evaluated step with score ``< threshold``, or the last evaluated step when censored.
        censored: no evaluation crossed (the onset is later than ``step``, or never).
    """

    step: int
    censored: bool


def find_onset(steps: Sequence[int], scores: Sequence[float], threshold: float) -> Onset:
    """The onset: the first evaluation with ``score < threshold``; censored at the last step if none.

    Args:
        steps: evaluated training steps, increasing.
        scores: the in-context score at each (NaN never crosses).
        threshold: the onset threshold (negative: the score falls at onset).
    """
    if len(steps) != len(scores) or not steps:
        raise ValueError(
            f"steps and scores must be non-empty and of equal length, got {len(steps)}, {len(scores)}"
        )
    if any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError("steps must be increasing")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    for step, score in zip(steps, scores, strict=True):
        if score < threshold:
            return Onset(int(step), False)
    return Onset(int(steps[-1]), True)
