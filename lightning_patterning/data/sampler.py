"""A ``DistributedSampler`` with mutable per-sample (or per-group) weights, drawn lazily in chunks.

Sampling rule (weights ``w``, see :mod:`lightning_patterning.data.weights` for groups)::

    P(index = i) = w_i / Σ_j w_j

Every rank computes the same *global* draw of the epoch, one chunk at a time, and keeps the positions
``rank, rank + R, rank + 2R, …`` of it (``R = num_replicas``), so the ranks' shards are disjoint as
positions and together form the global draw. Randomness comes only from private generators seeded by
``derive_seed(seed, epoch, weight version, block)`` (``sgld.seeding``): no global RNG, the same
result on every rank and machine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence, Sized
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_patterning.data.weights import (
    cumulative,
    draw_with_replacement,
    draw_without_replacement,
    per_sample_weights,
    validate_groups,
    validate_weights,
)
from lightning_patterning.sgld.seeding import private_generator

__all__ = ["WeightedDistributedSampler"]

InitialMass = Literal["natural", "equal"]
_INITIAL_MASSES = ("natural", "equal")
_CONFIG_KEYS = ("seed", "chunk_size", "replacement", "num_samples", "drop_last", "dataset_length")


class _Segment(NamedTuple):
    """Weights (and their version) in use from global position ``start`` of an epoch on."""

    start: int
    version: int
    weights: Tensor


class _EpochDraw:
    """One epoch's global draw as far as it is known: weight segments, order, progress of this rank."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.segments: list[_Segment] = []
        self.order: Tensor | None = None  # without replacement: the epoch's global order, unpadded
        self.limit = 0  # without replacement: the most indices the epoch may hold (fixed at its start)
        self.drawn_until = 0  # global positions already drawn (a multiple of chunk_size · num_replicas)
        self.position = 0  # indices of this rank already yielded


class WeightedDistributedSampler(DistributedSampler[int]):
    """Weighted sampling for (distributed) training, with weights that may change mid-epoch.

    With ``replacement=True`` the epoch draws ``num_samples`` i.i.d. indices with
    ``P(i) ∝ weights[i]`` (per-group weights: ``P(i) ∝ weights[g(i)] / n_{g(i)}``, i.e. a group's weight
    is its total mass). With ``replacement=False`` the epoch is a weighted order without replacement
    (Efraimidis–Spirakis: sort by ``E_i / w_i``, ``E_i ~ Exp(1)``) of the positive-weight samples,
    truncated to ``num_samples``; zero-weight samples are never drawn, so with fewer than ``num_samples``
    positive weights the epoch is shorter (``len()`` says so at the epoch's start; a later change can
    only shorten the epoch further, never lengthen it past that).

    Each rank gets ``ceil(total / num_replicas)`` indices (``floor`` with ``drop_last``); without
    ``drop_last`` the global draw is padded: with replacement by further draws, without replacement by
    repeating the epoch's first indices (as ``DistributedSampler`` does). With fixed weights the global
    draw does not depend on ``num_replicas`` (it is drawn in blocks of ``chunk_size`` global positions).

    Lag of :meth:`set_weights`: indices are drawn lazily, ``chunk_size`` per rank (``chunk_size ·
    num_replicas`` globally) at a time, so new weights apply from this rank's next chunk on: at most
    ``chunk_size − 1`` more indices of this rank come from the old weights, i.e. at most
    ``ceil((chunk_size − 1) / batch_size)`` batches (``chunk_size / batch_size − 1`` when ``batch_size``
    divides ``chunk_size``), plus the ``num_workers · prefetch_factor`` batches a DataLoader with workers
    has already requested. The sampler lives in the main process, so workers need no notification.
    Without replacement, a weight change redraws the order of the samples not yet drawn this epoch.

    Determinism and resume: a chunk depends only on (``seed``, epoch, weight version, position), so
    every rank computes the same global draw. :meth:`state_dict` holds the weights, version, epoch,
    this rank's position and the weights each part of the current epoch was drawn with; after
    :meth:`load_state_dict` the next ``__iter__`` continues the saved epoch exactly where it stopped,
    later epochs run as usual. ``set_epoch`` works as in ``DistributedSampler``. The weights of each change
    within the current epoch are kept (one weight vector per change) so the epoch can be replayed.

    Weights are relative: any positive scale gives the same draw. ``weights`` reports them in one unit at
    all times, normalized to mean 1 over the entries (samples, or groups): with groups, group ``g``'s weight
    is ``G·m_g`` (``m_g`` its probability mass), so the natural mix reads ``G·n_g/N``.

    Args:
        dataset: a map-style dataset with ``__len__``.
        weights: one weight per sample, or one per group with ``groups``, any positive scale; default
            ``initial_mass``.
        groups: a group id ``0..G−1`` per sample; then ``weights`` has length ``G = max(groups) + 1``.
        initial_mass: without ``weights``: ``"natural"`` (default: every sample equally likely, i.e. each
            group's mass proportional to its size, the data's own mix) or ``"equal"`` (the same mass for
            every group, whatever its size). The two differ only with ``groups``.
        num_replicas: number of ranks; default the torch.distributed world size, or 1 when not initialized.
        rank: this rank; default the torch.distributed rank, or 0.
        seed: base seed, identical on all ranks.
        replacement: draw with (``True``) or without replacement within an epoch.
        num_samples: indices per epoch over all ranks; default ``len(dataset)`` (at most that without
            replacement). Note ``self.num_samples`` keeps ``DistributedSampler``'s per-rank meaning.
        chunk_size: indices of this rank drawn at a time (bounds the lag above).
        drop_last: drop the tail of the global draw instead of padding it to a multiple of ``num_replicas``.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        weights: Tensor | Sequence[float] | None = None,
        groups: Tensor | Sequence[int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        replacement: bool = True,
        num_samples: int | None = None,
        chunk_size: int = 256,
        drop_last: bool = False,
        initial_mass: InitialMass = "natural",
    ) -> None:
        if initial_mass not in _INITIAL_MASSES:
            raise ValueError(f"initial_mass must be one of {_INITIAL_MASSES}, got {initial_mass!r}")
        if not isinstance(dataset, Sized):
            raise TypeError(
                f"dataset must be a map-style dataset with __len__; {type(dataset).__name__} has no __len__"
            )
        length = len(dataset)
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last
        )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        num_samples = length if num_samples is None else num_samples
        limit = "a positive int" if replacement else f"an int in [1, len(dataset) = {length}]"
        if not isinstance(num_samples, int) or num_samples < 1 or (not replacement and num_samples > length):
            raise ValueError(f"num_samples must be {limit}, got {num_samples!r}")
        self.replacement = bool(replacement)
        self.chunk_size = chunk_size
        self.dataset_length = length
        self.global_num_samples = num_samples
        self.num_samples = self._split(num_samples)  # per rank, as in DistributedSampler
        self.total_size = self.num_samples * self.num_replicas
        self.groups: Tensor | None = None
        self._counts: Tensor | None = None
        if groups is not None:
            self.groups = validate_groups(groups, length)
            self._counts = torch.bincount(self.groups, minlength=int(self.groups.max()) + 1 if length else 0)
        self.num_weights = length if self._counts is None else len(self._counts)
        default = torch.ones(self.num_weights, dtype=torch.float64)
        if self._counts is not None and initial_mass == "natural":
            default = self._counts.to(torch.float64)
        self._weights = self._validated(default if weights is None else weights)
        self._version = 0
        self._draw: _EpochDraw | None = None
        self._resume: _EpochDraw | None = None
        self._probs: dict[int, Tensor] = {}  # per weight version: per-sample weights
        self._cdfs: dict[int, tuple[Tensor, int]] = {}  # per weight version: their CDF
        self._warned_world = False

    # ------------------------------------------------------------------ weights

    @property
    def weights(self) -> Tensor:
        """The weights in use (per sample, or per group with ``groups``), float64, normalized to mean 1
        over the entries (a new tensor; ``weights / weights.sum()`` is each entry's probability mass)."""
        return self._weights / self._weights.mean()

    @property
    def group_sizes(self) -> Tensor | None:
        """Samples per group (``None`` with per-sample weights)."""
        return None if self._counts is None else self._counts.clone()

    @property
    def version(self) -> int:
        """Number of :meth:`set_weights` calls so far (part of the draw's seed)."""
        return self._version

    def set_weights(self, weights: Tensor | Sequence[float]) -> None:
        """Replace the weights; they apply from this rank's next chunk (see the class docstring for the lag).

        Raises:
            ValueError: wrong length, NaN/inf, negative, or zero sum; the weights in use are then unchanged.
        """
        self._weights = self._validated(weights)
        self._version += 1

    def _validated(self, weights: Tensor | Sequence[float]) -> Tensor:
        tensor = validate_weights(weights, self.num_weights)
        per_sample_weights(tensor, self.groups, self._counts)
        return tensor

    def _clear_cache(self) -> None:
        self._probs.clear()
        self._cdfs.clear()

    def _sample_probs(self, segment: _Segment) -> Tensor:
        """Per-sample weights of a segment, cached for the latest version only (memory stays O(N))."""
        if segment.version not in self._probs:
            self._clear_cache()
            self._probs[segment.version] = per_sample_weights(segment.weights, self.groups, self._counts)
        return self._probs[segment.version]

    def _sample_cdf(self, segment: _Segment) -> tuple[Tensor, int]:
        if segment.version not in self._cdfs:
            probs = self._sample_probs(segment)
            self._cdfs[segment.version] = cumulative(probs)
        return self._cdfs[segment.version]

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Indices this rank yields in the current epoch (see the class docstring for zero weights)."""
        if self.replacement:
            return self.num_samples
        draw = self._current()
        if draw is not None and draw.order is not None:
            return self._rank_total(draw)
        positive = int((per_sample_weights(self._weights, self.groups, self._counts) > 0).sum())
        return self._split(min(self.global_num_samples, positive))

    def __iter__(self) -> Iterator[int]:
        return self._iterate()

    def _iterate(self) -> Iterator[int]:
        self._check_world()
        resume, self._resume = self._resume, None
        draw = resume if resume is not None and resume.epoch == self.epoch else _EpochDraw(self.epoch)
        if draw is not resume:
            self._clear_cache()
        self._draw = draw
        size, replicas = self.chunk_size, self.num_replicas
        while True:
            if draw.segments and draw.position >= self._rank_total(draw):
                return
            chunk = draw.position // size
            start = chunk * size * replicas
            self._advance(draw, start)
            total = self._rank_total(draw)
            if draw.position >= total:
                return
            stop = min(start + size * replicas, total * replicas)
            local = self._global_indices(draw, start, stop)[self.rank :: replicas]
            for index in local[draw.position - chunk * size :].tolist():
                draw.position += 1
                yield index

    def _split(self, total: int) -> int:
        return total // self.num_replicas if self.drop_last else math.ceil(total / self.num_replicas)

    def _rank_total(self, draw: _EpochDraw) -> int:
        if self.replacement:
            return self.num_samples
        return self._split(len(draw.order)) if draw.order is not None else 0

    def _advance(self, draw: _EpochDraw, start: int) -> None:
        """Before drawing the chunk at global ``start``: log new weights (unless replaying a drawn chunk)."""
        if start < draw.drawn_until:
            return
        if not draw.segments or draw.segments[-1].version != self._version:
            self._apply(draw, _Segment(start, self._version, self._weights))
        draw.drawn_until = start + self.chunk_size * self.num_replicas

    def _apply(self, draw: _EpochDraw, segment: _Segment) -> None:
        """Start a weight segment; without replacement (re)draw the order of the not-yet-drawn samples."""
        draw.segments.append(segment)
        if self.replacement:
            return
        probs = self._sample_probs(segment)
        generator = private_generator(
            self.seed, draw.epoch, segment.version, segment.start // self.chunk_size
        )
        available = torch.ones(self.dataset_length, dtype=torch.bool)
        if draw.order is None:
            draw.order = draw_without_replacement(probs, available, generator)[: self.global_num_samples]
            draw.limit = len(draw.order)
        elif segment.start < len(draw.order):
            done = draw.order[: segment.start]
            available[done] = False
            rest = draw_without_replacement(probs, available, generator)
            draw.order = torch.cat([done, rest])[: draw.limit]

    def _global_indices(self, draw: _EpochDraw, start: int, stop: int) -> Tensor:
        """The global draw at positions ``start..stop−1`` (``start`` is a multiple of ``chunk_size``)."""
        if not self.replacement:
            assert draw.order is not None
            return draw.order[torch.arange(start, stop) % len(draw.order)]
        blocks = []
        for block in range(start // self.chunk_size, math.ceil(stop / self.chunk_size)):
            segment = next(s for s in reversed(draw.segments) if s.start <= block * self.chunk_size)
            generator = private_generator(self.seed, draw.epoch, segment.version, block)
            blocks.append(draw_with_replacement(self._sample_cdf(segment), self.chunk_size, generator))
        return torch.cat(blocks)[: stop - start]

    def _current(self) -> _EpochDraw | None:
        """The draw of the current epoch: in progress, or restored and not yet iterated."""
        for draw in (self._draw, self._resume):
            if draw is not None and draw.epoch == self.epoch:
                return draw
        return None

    def _check_world(self) -> None:
        if self._warned_world or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() != self.num_replicas:
            self._warned_world = True
            warnings.warn(
                f"WeightedDistributedSampler has num_replicas={self.num_replicas} but the torch.distributed "
                f"world size is {dist.get_world_size()}: ranks will not get disjoint shards. Pass "
                "num_replicas=trainer.world_size and rank=trainer.global_rank (PatterningDataModule does).",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ state

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Weights, version, epoch, position and the current epoch's weight segments.

        Args:
            consumed: indices of this rank actually used in the current epoch, when fewer than yielded
                (DataLoader prefetch); ``>= len(self)`` marks the epoch as finished. Default: all yielded.

        Returns:
            A dict of plain values and tensors (tensors may be shared with the sampler: do not modify).
            A finished epoch is saved as the start of the next one.
        """
        draw = self._current()
        state: dict[str, Any] = {"weights": self._weights, "version": self._version, "epoch": self.epoch}
        state.update(position=0, drawn_until=0, segments=[], num_replicas=self.num_replicas)
        state["config"] = {key: getattr(self, _attr(key)) for key in _CONFIG_KEYS}
        if draw is None:
            return state
        position = draw.position if consumed is None else max(0, int(consumed))
        if draw.segments and position >= self._rank_total(draw):
            state["epoch"] = draw.epoch + 1
            return state
        state.update(epoch=draw.epoch, position=position, drawn_until=draw.drawn_until)
        state["segments"] = [
            {"start": s.start, "version": s.version, "weights": s.weights} for s in draw.segments
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``__iter__`` continues the saved epoch from its position.

        A state saved with other settings (seed, chunk_size, replacement, num_samples, drop_last, dataset
        length) restores the weights, version and epoch only, and warns. A state saved with another
        ``num_replicas`` continues at the same global position (the shards of a rank differ then).

        Raises:
            ValueError: the saved weights do not fit this sampler.
        """
        weights = self._validated(state_dict["weights"])
        epoch, position = int(state_dict["epoch"]), int(state_dict.get("position", 0))
        segments = [
            _Segment(int(s["start"]), int(s["version"]), self._validated(s["weights"]))
            for s in state_dict.get("segments", [])
        ]
        config = state_dict.get("config", {})
        mismatched = [k for k in _CONFIG_KEYS if k in config and config[k] != getattr(self, _attr(k))]
        if mismatched and (position or segments):
            warnings.warn(
                f"WeightedDistributedSampler.load_state_dict: the state was saved with other {mismatched}; "
                "restoring weights, version and epoch only (the epoch restarts from its beginning).",
                stacklevel=2,
            )
            position, segments = 0, []
        self._weights, self._version, self.epoch = weights, int(state_dict["version"]), epoch
        self._draw, self._resume = None, None
        self._clear_cache()
        if not segments:
            return
        draw = _EpochDraw(epoch)
        for segment in segments:
            self._apply(draw, segment)
        saved_replicas = int(state_dict.get("num_replicas", self.num_replicas))
        draw.drawn_until = int(state_dict.get("drawn_until", 0))
        draw.position = min(position * saved_replicas // self.num_replicas, self._rank_total(draw))
        self._resume = draw


def _attr(key: str) -> str:
    return {"num_samples": "global_num_samples"}.get(key, key)
