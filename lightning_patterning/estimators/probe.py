"""The data axis of a susceptibility matrix: probe samples (by dataset index) and optional groups."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_patterning.sgld.batches import Batch, SampleSource

GroupSpec = None | str | Sequence[Hashable] | Callable[[Any], Hashable]
"""Groups of probe samples: a dataset field name, one label per sample of the probe dataset (or per selected
probe sample), or ``fn(sample) -> label``."""


class ProbeSet:
    """Fixed probe samples, collated once into batches, with their dataset indices and group labels.

    Args:
        probe: the probe data. A ``Subset`` of the training dataset keeps the training indices as
            ``sample_ids``; otherwise samples are numbered ``0 .. N−1``.
        indices: pick these indices of ``probe`` (e.g. training samples by index); checked against its length.
        groups: ``None`` (per-sample columns), a field name (samples are mappings, or the dataset has a
            sequence attribute of that name), one label per sample of ``probe`` (the same meaning as
            ``PatterningDataModule(groups=...)``: one id per sample of the dataset; also accepted: one label
            per selected probe sample), or ``fn(sample) -> label``.
        batch_size: size of the collated probe batches.
    """

    def __init__(
        self,
        probe: Dataset | DataLoader,
        indices: Sequence[int] | None = None,
        groups: GroupSpec = None,
        batch_size: int = 256,
    ) -> None:
        source = SampleSource(probe, argument="probe")
        dataset = source.dataset
        if indices is None:
            positions = torch.arange(source.size)
        else:
            positions = torch.as_tensor(list(indices), dtype=torch.long)
            bad = positions[(positions < 0) | (positions >= source.size)]
            if bad.numel():
                raise IndexError(
                    f"probe indices must lie in [0, {source.size}) (the probe dataset's length); "
                    f"got {bad[:5].tolist()}"
                )
        if positions.numel() == 0:
            raise ValueError("probe: no samples selected")
        self.sample_ids = _dataset_ids(dataset, positions)
        self.batches: list[Batch] = [source.fetch(chunk) for chunk in positions.split(batch_size)]
        self.size = int(positions.numel())
        self.group_names: list[str] | None = None
        self.group_index: torch.Tensor | None = None
        if groups is not None:
            labels = _group_labels(dataset, positions, groups)
            names = list(dict.fromkeys(labels))
            self.group_names = [str(n) for n in names]
            lookup = {n: i for i, n in enumerate(names)}
            self.group_index = torch.tensor([lookup[label] for label in labels], dtype=torch.long)

    def group_means(self, values: torch.Tensor) -> torch.Tensor:
        """Average the last dimension ``[..., N]`` within each group: ``[..., groups]``."""
        assert self.group_index is not None and self.group_names is not None
        sums = torch.zeros(*values.shape[:-1], len(self.group_names), dtype=values.dtype)
        sums.index_add_(values.ndim - 1, self.group_index, values)
        counts = torch.bincount(self.group_index, minlength=len(self.group_names)).to(values.dtype)
        return sums / counts


def _dataset_ids(dataset: Any, positions: torch.Tensor) -> torch.Tensor:
    if isinstance(dataset, Subset):
        return torch.as_tensor(list(dataset.indices), dtype=torch.long)[positions]
    return positions.clone()


def _group_labels(dataset: Any, positions: torch.Tensor, groups: GroupSpec) -> list[Hashable]:
    if isinstance(groups, str):
        field = groups
        column = getattr(dataset, field, None)
        if column is not None and not callable(column):
            return [_label(column[int(i)]) for i in positions]
        samples = [dataset[int(i)] for i in positions]
        if not all(isinstance(s, dict) and field in s for s in samples):
            raise ValueError(
                f"groups={field!r}: the probe samples are not mappings with that field and the dataset has "
                "no attribute of that name; pass one label per sample or a function instead"
            )
        return [_label(s[field]) for s in samples]
    if callable(groups):
        return [_label(groups(dataset[int(i)])) for i in positions]
    labels = list(groups)
    if len(labels) == len(dataset):  # one label per sample of the probe dataset
        return [_label(labels[int(i)]) for i in positions]
    if len(labels) != len(positions):
        raise ValueError(
            f"groups: got {len(labels)} labels; give one per sample of the probe dataset ({len(dataset)}) "
            f"or one per selected probe sample ({len(positions)})"
        )
    return [_label(label) for label in labels]


def _label(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else tuple(value.tolist())
    return value
