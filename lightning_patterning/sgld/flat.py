"""One flat vector per chain: the sampled parameters of a chain, concatenated, and views back into them.

A chain's sampled parameters live in one contiguous vector per dtype (usually exactly one vector). The
SGMCMC step then updates a chain with a handful of tensor operations whatever the number of parameter
tensors, which keeps one optimizer and one noise generator per chain as cheap as one optimizer over all
chains stacked together. The module sees each parameter as a view of that vector (``unflatten``), so
gradients of a forward flow back into the vector.

The same layout works for a stack of chains: ``unflatten`` of ``[chains, D]`` vectors gives
``[chains, *shape]`` views, the input of a vmapped forward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch


class _Slot(NamedTuple):
    """Where a parameter lives: vector ``group``, entries ``start:stop``, parameter ``shape``."""

    group: int
    start: int
    stop: int
    shape: torch.Size


class FlatLayout:
    """The layout of named tensors inside one flat vector per (dtype, device).

    Args:
        tensors: name → tensor, in the order the vectors concatenate them.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        keys: list[tuple[torch.dtype, torch.device]] = []
        sizes: list[int] = []
        self._slots: dict[str, _Slot] = {}
        for name, tensor in tensors.items():
            key = (tensor.dtype, tensor.device)
            if key not in keys:
                keys.append(key)
                sizes.append(0)
            group = keys.index(key)
            start = sizes[group]
            sizes[group] += tensor.numel()
            self._slots[name] = _Slot(group, start, sizes[group], tensor.shape)
        self.keys = keys
        self.sizes = sizes
        self._splits = [
            [s.stop - s.start for s in self._slots.values() if s.group == g] for g in range(len(keys))
        ]

    @property
    def names(self) -> list[str]:
        """The names, in layout order."""
        return list(self._slots)

    def group_of(self, name: str) -> int:
        """The index of the vector that holds ``name``."""
        return self._slots[name].group

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """New flat vectors (one per group, ``[..., D_g]``) holding ``tensors`` (which may carry the same
        leading dimensions)."""
        pieces: list[list[torch.Tensor]] = [[] for _ in self.keys]
        for name, slot in self._slots.items():
            tensor = tensors[name]
            lead = tensor.shape[: tensor.ndim - len(slot.shape)]
            pieces[slot.group].append(tensor.reshape(*lead, slot.stop - slot.start))
        return [torch.cat(group, dim=-1) for group in pieces]

    def unflatten(self, vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views ``name → [..., *shape]`` into the vectors ``[..., D_g]`` (differentiable).

        One ``split`` per vector, not one slice per parameter: the backward of ``split`` concatenates the
        parameters' gradients into one ``[..., D_g]`` tensor, where per-parameter slices would each
        materialize a zero-filled ``[..., D_g]`` gradient (measured: +140 ms per step of 4 chains of a
        1M-parameter LM with 54 parameter tensors)."""
        pieces = [
            iter(vector.split(sizes, dim=-1)) for vector, sizes in zip(vectors, self._splits, strict=True)
        ]
        views = {}
        for name, slot in self._slots.items():
            vector = vectors[slot.group]
            views[name] = next(pieces[slot.group]).view(*vector.shape[:-1], *slot.shape)
        return views
