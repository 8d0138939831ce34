"""Minibatches for SGLD chains, drawn from private generators (never the global RNG).

Each chain has its own index stream, seeded by (seed, run, chain), which walks through random
permutations of the dataset (sampling without replacement within a pass, like a shuffled DataLoader).
A step of ``C`` chains fetches ``C × B`` samples in one collation and reshapes them to ``[C, B, ...]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lightning_patterning.sgld.seeding import private_generator

Batch = Any
Collate = Callable[[list[Any]], Batch]


class IndexStream:
    """Endless stream of dataset indices: consecutive random permutations of ``range(n)``."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self._n = n
        self._generator = generator
        self._permutation = torch.randperm(n, generator=generator)
        self._cursor = 0

    def take(self, count: int) -> torch.Tensor:
        """The next ``count`` indices (crossing into a fresh permutation when one is used up)."""
        pieces = []
        while count > 0:
            if self._cursor == self._n:
                self._permutation = torch.randperm(self._n, generator=self._generator)
                self._cursor = 0
            chunk = self._permutation[self._cursor : self._cursor + count]
            self._cursor += len(chunk)
            count -= len(chunk)
            pieces.append(chunk)
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class SampleSource:
    """Random-access view of the data behind a DataLoader or a map-style Dataset.

    ``fetch(indices)`` collates the samples at ``indices`` with the loader's ``collate_fn``; for a
    ``TensorDataset`` it indexes the tensors directly (same result as ``default_collate``, much faster).
    """

    def __init__(self, data: DataLoader | Dataset, argument: str = "dataloader") -> None:
        dataset = data.dataset if isinstance(data, DataLoader) else data
        collate = data.collate_fn if isinstance(data, DataLoader) else default_collate
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                f"{argument}: SGLD needs a map-style dataset (with __getitem__ and __len__) so that chains "
                f"can draw their own minibatches; got an IterableDataset ({type(dataset).__name__})"
            )
        if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
            raise TypeError(f"{argument}: expected a DataLoader or a Dataset, got {type(data).__name__}")
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as error:
            raise TypeError(
                f"{argument}: the dataset must define __len__ ({type(dataset).__name__})"
            ) from error
        if size == 0:
            raise ValueError(f"{argument}: the dataset is empty")
        self.dataset = dataset
        self.size = size
        self._collate: Collate = collate
        self._tensors = (
            dataset.tensors if isinstance(dataset, TensorDataset) and collate is default_collate else None
        )

    def fetch(self, indices: torch.Tensor) -> Batch:
        """The collated batch of the samples at ``indices`` (a 1-D index tensor)."""
        if self._tensors is not None:
            return [t[indices] for t in self._tensors]
        return self._collate([self.dataset[int(i)] for i in indices])


def split_leading(batch: Batch, chains: int) -> Batch:
    """Reshape every tensor of a batch of ``chains × B`` samples to ``[chains, B, ...]``."""

    def reshape(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.reshape(chains, leaf.shape[0] // chains, *leaf.shape[1:])
        return leaf

    return tree_map(reshape, batch)


def chain_slice(batch: Batch, chain: int) -> Batch:
    """Chain ``chain``'s minibatch out of a ``[chains, B, ...]`` batch."""
    return tree_map(lambda leaf: leaf[chain] if isinstance(leaf, torch.Tensor) else leaf, batch)


def batch_to(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device``."""
    return tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf, batch)


class ChainBatches:
    """Per-chain minibatch streams for a set of chains, seeded by ``(seed, run, chain)``, or with
    ``shared=True`` one stream seeded by ``(seed, run)`` that every chain reads.

    Results therefore do not depend on which process runs which chain.
    """

    def __init__(
        self,
        source: SampleSource,
        batch_size: int,
        chain_ids: Sequence[int],
        seed: int,
        run: int,
        shared: bool = False,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.chain_ids = list(chain_ids)
        self.shared = shared
        self.last_indices: torch.Tensor | None = None
        self._streams = (
            [IndexStream(source.size, private_generator(seed, run, "batches", "shared"))]
            if shared
            else [
                IndexStream(source.size, private_generator(seed, run, "batches", chain))
                for chain in self.chain_ids
            ]
        )

    def next_indices(self) -> torch.Tensor:
        """Indices of the next step: ``[streams, B]`` (one row per chain, or one shared row); also kept as
        ``last_indices`` (e.g. to name the samples of a minibatch whose loss is non-finite)."""
        self.last_indices = torch.stack([stream.take(self.batch_size) for stream in self._streams])
        return self.last_indices

    def next_stacked(self) -> Batch:
        """The next step's minibatches of all chains as one ``[chains, B, ...]`` batch; with ``shared``,
        one fetch broadcast (without a copy) to every chain."""
        if self.shared:
            batch = self.source.fetch(self.next_indices()[0])
            chains = len(self.chain_ids)
            return tree_map(
                lambda t: t.unsqueeze(0).expand(chains, *t.shape) if isinstance(t, torch.Tensor) else t, batch
            )
        indices = self.next_indices()
        return split_leading(self.source.fetch(indices.reshape(-1)), len(self.chain_ids))


def reference_indices(size: int, batch_size: int, count: int, seed: int, run: int) -> list[torch.Tensor]:
    """Dataset indices of ``count`` minibatches for ``L(w*)``, from a stream shared by every process (same on
    all ranks); minibatches are at most the whole dataset (``batch_size`` is capped at ``size``)."""
    stream = IndexStream(size, private_generator(seed, run, "reference"))
    return [stream.take(min(batch_size, size)) for _ in range(count)]


def reference_batches(source: SampleSource, batch_size: int, count: int, seed: int, run: int) -> list[Batch]:
    """The minibatches of ``reference_indices``."""
    return [source.fetch(i) for i in reference_indices(source.size, batch_size, count, seed, run)]


def capped_batch_size(batch_size: int, source: SampleSource, argument: str = "SGLDConfig.batch_size") -> int:
    """``batch_size``, or the dataset's size when it is smaller, with a warning that says so (a minibatch
    larger than the data would repeat samples within one step)."""
    if batch_size <= source.size:
        return batch_size
    warnings.warn(
        f"{argument} = {batch_size} exceeds the {source.size} samples of the SGLD data: every minibatch is "
        f"the whole set of {source.size} samples (set batch_size <= {source.size} to silence this)",
        UserWarning,
        stacklevel=3,
    )
    return source.size
