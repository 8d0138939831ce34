"""The columns of a susceptibility matrix: probe samples, or tokens (sample, position) as samples.

A loss function that returns per-position losses ``[B, T]`` (optionally with a mask of the positions that
are samples, ``sgld.functional.LossFn``) makes every valid ``(probe sample n, position t)`` pair a column
of its own, so ``χ`` is ``[k, N, T]`` (docs/concepts/susceptibilities.md, "Tokens as samples"). Internally
the ``N·T`` pairs are flattened row-major into ``N·T`` columns of the running sums (memory
``O(k·N·T)``, never growing with draws); invalid positions are held at 0 there and reported as NaN.

Groups aggregate columns by the mean over their members, ``χ_g = mean_{z ∈ g} χ_z`` (exact on the same
draws): with per-position losses a member is a valid token, labelled either by its probe sample's group
(``groups=``, as for per-sample losses) or by a label of its own (``token_groups=``: a pattern class per
token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_patterning.estimators.probe import ProbeSet
from lightning_patterning.sgld.batches import Batch

TokenGroupSpec = None | torch.Tensor | Callable[[Batch], torch.Tensor]
"""Token labels: a LongTensor ``[N, T]`` (one class id ``>= 0`` per probe position), or
``fn(batch) -> LongTensor[B, T]`` applied to each collated probe batch (e.g. the same ``token_classes``
function that sets per-token training weights)."""

LossOutput = tuple[torch.Tensor, torch.Tensor | None]


class ProbeColumns:
    """Column layout of ``χ`` for a probe set, given the loss function's output on it at ``w*``.

    Args:
        probe: the probe samples (batches, ids, per-sample groups).
        outputs: ``(losses, mask)`` of every probe batch at the checkpoint, in order.
        token_groups: labels per token (per-position losses only); exclusive with the probe's ``groups``.

    Attributes:
        token_mask: ``[N, T]`` True at the positions that are samples (``None``: per-sample losses).
        size: number of flat columns of the running sums (``N`` or ``N·T``).
        group_names: column labels of the grouped matrix (``None``: no groups).
        group_index: ``[N]`` (per sample) or ``[N, T]`` (per token; −1 at invalid positions) group of each
            member, or ``None``.

    Raises:
        ValueError: probe batches disagree on per-sample vs per-position losses or on ``T``; no probe
            position is valid; ``token_groups`` of the wrong shape or with negative labels at valid
            positions, or given together with ``groups`` or with per-sample losses.
    """

    def __init__(self, probe: ProbeSet, outputs: Sequence[LossOutput], token_groups: TokenGroupSpec = None):
        self.sample_ids = probe.sample_ids
        shapes = {tuple(losses.shape[1:]) for losses, _ in outputs}
        if len(shapes) != 1:
            raise ValueError(
                "loss_fn must return the same per-sample shape for every probe batch (either [B] or "
                f"[B, T] with one T: pad the probe sequences to a common length); got {sorted(shapes)}"
            )
        shape = shapes.pop()
        self.token_mask: torch.Tensor | None = None
        if len(shape) == 1:  # per-position losses [B, T]
            masks = [
                m.cpu() if m is not None else torch.ones(losses.shape, dtype=torch.bool)
                for losses, m in outputs
            ]
            self.token_mask = torch.cat(masks)
            if not bool(self.token_mask.any()):
                raise ValueError("loss_fn's mask marks no valid position in the whole probe set")
        n = probe.size
        self.size = n if self.token_mask is None else self.token_mask.numel()
        self.group_names: list[str] | None = probe.group_names
        self.group_index: torch.Tensor | None = probe.group_index
        self._flat_index: torch.Tensor | None = probe.group_index
        if token_groups is not None:
            if self.token_mask is None:
                raise ValueError("token_groups needs per-position losses (loss_fn returning [B, T])")
            if probe.group_names is not None:
                raise ValueError("give groups (per probe sample) or token_groups (per token), not both")
            self._set_token_groups(_token_labels(token_groups, probe.batches, self.token_mask.shape))
        elif self.token_mask is not None and probe.group_index is not None:
            index = probe.group_index[:, None].expand(self.token_mask.shape)
            self.group_index = torch.where(self.token_mask, index, -1)
            self._flat_index = self.group_index.flatten()

    @property
    def per_token(self) -> bool:
        """Whether columns are tokens (per-position losses)."""
        return self.token_mask is not None

    def _set_token_groups(self, labels: torch.Tensor) -> None:
        assert self.token_mask is not None
        valid = labels[self.token_mask]
        if bool((valid < 0).any()):
            raise ValueError("token_groups: labels at valid positions must be >= 0")
        classes = torch.unique(valid)
        self.group_names = [str(int(c)) for c in classes]
        lookup = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
        lookup[classes] = torch.arange(len(classes))
        self.group_index = torch.where(self.token_mask, lookup[labels.clamp(min=0)], -1)
        self._flat_index = self.group_index.flatten()

    def flatten(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[C, size]`` from per-batch losses ``[C, B]`` or ``[C, B, T]``; invalid positions become 0."""
        joined = torch.cat(list(values), dim=1)
        if self.token_mask is None:
            return joined
        mask = self.token_mask.to(joined.device)
        return torch.where(mask, joined, torch.zeros((), dtype=joined.dtype, device=joined.device)).flatten(1)

    def group_means(self, values: torch.Tensor) -> torch.Tensor:
        """Average the flat columns ``[..., size]`` within each group (valid members only): ``[..., G]``."""
        assert self._flat_index is not None and self.group_names is not None
        keep = self._flat_index >= 0
        index = self._flat_index[keep]
        sums = torch.zeros(*values.shape[:-1], len(self.group_names), dtype=values.dtype)
        sums.index_add_(values.ndim - 1, index, values[..., keep])
        counts = torch.bincount(index, minlength=len(self.group_names)).to(values.dtype)
        return sums / counts

    def columns(self, values: torch.Tensor) -> torch.Tensor:
        """Flat columns ``[..., size]`` to the result's columns: groups ``[..., G]``, or ``[..., N, T]``
        with NaN at invalid positions, or ``[..., N]`` unchanged."""
        if self.group_names is not None:
            return self.group_means(values)
        if self.token_mask is None:
            return values
        shaped = values.reshape(*values.shape[:-1], *self.token_mask.shape)
        return torch.where(self.token_mask, shaped, torch.full((), torch.nan, dtype=values.dtype))


def batch_means(outputs: Sequence[LossOutput]) -> torch.Tensor:
    """``[chains]`` mean over batches of each batch's mean over its valid samples, from per-batch
    ``(losses [C, B(, T)], mask)`` (mask ``[B, T]`` broadcast over chains)."""
    means = []
    for losses, mask in outputs:
        values = losses.double()
        if mask is None:
            means.append(values.flatten(1).mean(dim=1))
        else:
            m = mask.to(values.device)
            total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
            means.append(total.flatten(1).sum(dim=1) / m.sum().to(values.dtype))
    return torch.stack(means).mean(dim=0)


def _token_labels(spec: TokenGroupSpec, batches: Sequence[Batch], shape: torch.Size) -> torch.Tensor:
    if callable(spec) and not isinstance(spec, torch.Tensor):
        labels = torch.cat([_as_labels(spec(batch), "token_groups(batch)") for batch in batches])
    else:
        labels = _as_labels(spec, "token_groups")
    if labels.shape != shape:
        raise ValueError(
            f"token_groups must give one label per probe position, shape {list(shape)} (like the "
            f"per-position losses); got {list(labels.shape)}"
        )
    return labels


def _as_labels(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of class ids, got {type(value).__name__}")
    return value.detach().cpu().long()
