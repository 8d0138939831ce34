"""Weighted training data for Lightning: a DataModule wrapper and a DataLoader helper.

``PatterningDataModule(dm)`` behaves like ``dm`` except that its training DataLoader draws with a
:class:`~lightning_patterning.data.sampler.WeightedDistributedSampler` (``P(i) ∝ w_i``, or per-group
mass) whose weights can be changed at any time (``set_weights``), e.g. by ``PatterningCallback``.
Being a ``DistributedSampler``, Lightning neither replaces nor wraps it under DDP and calls its
``set_epoch`` each epoch; each rank builds it with ``num_replicas = trainer.world_size`` and
``rank = trainer.global_rank``. Its state (weights, epoch, position) is saved in checkpoints through
the DataModule's ``state_dict``, so ``trainer.fit(ckpt_path=...)`` continues the same draw.

Per-token weights (tokens as samples): with ``token_classes=`` the wrapper also holds a
:class:`~lightning_patterning.patterning.tokens.TokenWeightRule` (one weight per token pattern class,
``set_token_weights``), which ``lp.weighted_loss(per_token_loss, batch, self)`` applies in the module's
``training_step``; its state is saved in the same ``state_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset

from lightning_patterning.data.sampler import InitialMass, WeightedDistributedSampler
from lightning_patterning.data.weights import validate_groups, validate_weights
from lightning_patterning.patterning.tokens import TokenClasses, TokenWeightRule

__all__ = ["PatterningDataModule", "weighted_dataloader"]

_DELEGATED_IF_DEFINED = (
    "val_dataloader",
    "test_dataloader",
    "predict_dataloader",
    "on_before_batch_transfer",
    "transfer_batch_to_device",
    "on_after_batch_transfer",
)


class PatterningDataModule(pl.LightningDataModule):
    """Wraps a DataModule so that training batches are drawn with mutable weights.

    Everything but the training DataLoader is the wrapped module's (``prepare_data``, ``setup``, the
    val/test/predict loaders, batch-transfer hooks, ``teardown`` and any other attribute). The training
    DataLoader keeps the wrapped one's dataset, batch size, collate_fn, workers and other settings and
    draws with a :class:`WeightedDistributedSampler` (see it for the sampling rule and the lag of a weight
    change: at most ``ceil((chunk_size − 1) / batch_size)`` batches, plus ``num_workers · prefetch_factor``).

    Before any ``set_weights`` the draw is the data's natural mix (every training sample equally likely;
    with groups, each group's mass proportional to its size), unless ``initial_mass="equal"``.
    ``weights`` reports the weights in one unit at all times: normalized to mean 1 over the entries
    (samples, or groups); ``set_weights`` takes any positive scale.

    Args:
        datamodule: the DataModule to wrap; its ``train_dataloader()`` must return a map-style DataLoader.
        groups: per-group weights instead of per-sample ones: the name of a field of the samples (dict
            samples) or of a sequence attribute of the dataset holding each sample's group id, or the
            group ids themselves (one per training sample, checked when the training DataLoader is
            built). ``None``: one weight per sample.
        initial_mass: ``"natural"`` (default; mass proportional to group size) or ``"equal"`` (the same
            mass for every group); only matters with ``groups`` and before the first ``set_weights``.
        replacement: draw with replacement (default) or an epoch-long weighted order without it.
        chunk_size: indices per rank drawn at a time.
        seed: seed of the draw, identical on all ranks.
        token_classes: per-token weights: ``fn(batch) -> LongTensor[B, T]``, a pattern class per position of
            the per-position losses (or its import path), read by ``lp.weighted_loss``. ``None``: no token
            weights.
        num_token_classes: the number of classes ``token_classes`` returns (required with it).
        token_class_names: optional class names (TensorBoard tags).
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
        groups: str | list[int] | None = None,
        replacement: bool = True,
        chunk_size: int = 256,
        seed: int = 0,
        initial_mass: InitialMass = "natural",
        token_classes: TokenClasses | str | None = None,
        num_token_classes: int | None = None,
        token_class_names: list[str] | None = None,
    ) -> None:
        if initial_mass not in ("natural", "equal"):
            raise ValueError(f"initial_mass must be 'natural' or 'equal', got {initial_mass!r}")
        if not isinstance(datamodule, pl.LightningDataModule):
            raise TypeError(f"datamodule must be a LightningDataModule, got {type(datamodule).__name__}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        super().__init__()
        self.datamodule = datamodule
        self.groups = groups
        self.replacement = replacement
        self.chunk_size = chunk_size
        self.seed = seed
        self.initial_mass = initial_mass
        self.prepare_data_per_node = datamodule.prepare_data_per_node
        self.allow_zero_length_dataloader_with_multiple_devices = (
            datamodule.allow_zero_length_dataloader_with_multiple_devices
        )
        for hook in _DELEGATED_IF_DEFINED:  # only what it defines, so Lightning's is_overridden stays true
            if is_overridden(hook, datamodule):
                setattr(self, hook, getattr(datamodule, hook))
        self.token_rule: TokenWeightRule | None = None
        if token_classes is not None:
            if num_token_classes is None:
                raise ValueError("num_token_classes is required with token_classes (the number of classes)")
            self.token_rule = TokenWeightRule(token_classes, num_token_classes, token_class_names)
        elif num_token_classes is not None or token_class_names is not None:
            raise ValueError("num_token_classes and token_class_names need token_classes")
        self._sampler: WeightedDistributedSampler | None = None
        self._batch_size: int = 1
        self._pending_weights: Tensor | None = None
        self._pending_state: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(inner, name)

    @property
    def hparams(self) -> Any:  # type: ignore[override]
        """The wrapped module's hyperparameters (logged and checkpointed by Lightning)."""
        return self.datamodule.hparams

    @property
    def hparams_initial(self) -> Any:  # type: ignore[override]
        """The wrapped module's initial hyperparameters."""
        return self.datamodule.hparams_initial

    # ------------------------------------------------------------------ delegated hooks

    def prepare_data(self) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def on_exception(self, exception: BaseException) -> None:
        self.datamodule.on_exception(exception)

    # ------------------------------------------------------------------ weighted training data

    def train_dataloader(self) -> DataLoader:
        """The wrapped training DataLoader, re-built around the weighted sampler (reused across reloads)."""
        self.datamodule.trainer = self.trainer
        loader = self.datamodule.train_dataloader()
        dataset = _check_loader(loader, "the wrapped DataModule's train_dataloader()")
        num_replicas, rank = 1, 0
        trainer = self.trainer
        if trainer is not None:
            kwargs = trainer.distributed_sampler_kwargs or {}
            num_replicas = int(kwargs.get("num_replicas", trainer.world_size))
            rank = int(kwargs.get("rank", trainer.global_rank))
        try:
            groups = resolve_groups(dataset, self.groups)
        except ValueError as error:
            raise ValueError(f"PatterningDataModule(groups=...): {error}") from error
        old = self._sampler
        if old is not None and _same_layout(old, dataset, groups, num_replicas, rank):
            old.dataset = dataset
        else:
            weights = self._pending_weights
            if old is not None:
                weights = old.weights if old.num_weights == _num_weights(dataset, groups) else None
                if weights is None:
                    warnings.warn(
                        f"The training data changed size: sampler weights reset to the {self.initial_mass} "
                        "mass.",
                        stacklevel=2,
                    )
            self._sampler = WeightedDistributedSampler(
                dataset,
                weights=weights,
                groups=groups,
                num_replicas=num_replicas,
                rank=rank,
                seed=self.seed,
                replacement=self.replacement,
                chunk_size=self.chunk_size,
                initial_mass=self.initial_mass,
            )
            self._pending_weights = None
        if self._pending_state is not None:
            self._sampler.load_state_dict(self._pending_state)
            self._pending_state = None
        self._batch_size = loader.batch_size or 1
        return _rebuild(loader, self._sampler)

    @property
    def sampler(self) -> WeightedDistributedSampler | None:
        """The training sampler (``None`` until the first ``train_dataloader()``)."""
        return self._sampler

    @property
    def weights(self) -> Tensor | None:
        """The weights in use (or set and not yet applied), normalized to mean 1 over the entries (samples
        or groups); ``weights / weights.sum()`` is each one's probability mass. ``None``: the training
        DataLoader is not built yet and no weights were set (the ``initial_mass`` will apply)."""
        if self._sampler is not None:
            return self._sampler.weights
        pending = self._pending_weights
        return None if pending is None else pending / pending.mean()

    def set_weights(self, weights: Tensor | Sequence[float]) -> None:
        """Set the sampling weights now, or when the sampler is built if it does not exist yet. Any
        positive scale: only ratios matter (e.g. the group sizes for the natural mix).

        Raises:
            ValueError: NaN/inf, negative, zero sum or (once the data is known) wrong length; the weights in
                use are then unchanged.
        """
        if self._sampler is not None:
            self._sampler.set_weights(weights)
            return
        try:
            length = weights.numel() if isinstance(weights, Tensor) else len(weights)
        except TypeError:
            length = 0
        self._pending_weights = validate_weights(weights, length)

    def set_token_weights(self, class_weights: Tensor | Sequence[float]) -> None:
        """Set the per-token weights: one weight per token class (stored normalised to mean 1 over classes).

        Raises:
            ValueError: negative, NaN/inf, all zero or wrong length (the weights in use are then unchanged),
                or no ``token_classes`` was given.
        """
        self._require_rule().set_class_weights(class_weights)

    @property
    def token_weights(self) -> Tensor | None:
        """A copy of the per-class token weights (``None`` without ``token_classes``)."""
        return None if self.token_rule is None else self.token_rule.class_weights

    def _require_rule(self) -> TokenWeightRule:
        if self.token_rule is None:
            raise ValueError(
                "per-token weights need PatterningDataModule(..., token_classes=fn, num_token_classes=K)"
            )
        return self.token_rule

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (position = batches trained this epoch), the token-weight rule's state and
        the wrapped module's state."""
        state: dict[str, Any] = {"datamodule": self.datamodule.state_dict(), "weights": self._pending_weights}
        if self.token_rule is not None:
            state["token_rule"] = self.token_rule.state_dict()
        if self._sampler is not None:
            state["sampler"] = self._sampler.state_dict(consumed=self._consumed(self._sampler))
        elif self._pending_state is not None:
            state["sampler"] = self._pending_state
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the sampler state is applied now, or when the sampler is built.

        Raises:
            ValueError: the saved pending weights are not valid weights (NaN/inf, negative, zero sum).
        """
        self.datamodule.load_state_dict(state_dict.get("datamodule", {}))
        if self.token_rule is not None and state_dict.get("token_rule") is not None:
            self.token_rule.load_state_dict(state_dict["token_rule"])
        weights = state_dict.get("weights")
        if weights is not None:  # validated like set_weights: a float64 CPU copy, whatever device it was on
            self._pending_weights = validate_weights(weights, len(weights))
        sampler_state = state_dict.get("sampler")
        if sampler_state is not None and self._sampler is not None:
            self._sampler.load_state_dict(sampler_state)
        elif sampler_state is not None:
            self._pending_state = sampler_state

    def _consumed(self, sampler: WeightedDistributedSampler) -> int | None:
        """This rank's indices trained on this epoch, from the fit loop (the DataLoader may run ahead)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.processed >= trainer.num_training_batches:
            return len(sampler)
        return progress.current.processed * self._batch_size


def weighted_dataloader(
    loader: DataLoader,
    weights: Tensor | Sequence[float] | None = None,
    groups: str | Sequence[int] | Tensor | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    replacement: bool = True,
    chunk_size: int = 256,
    seed: int = 0,
    initial_mass: InitialMass = "natural",
) -> DataLoader:
    """``loader`` re-built to draw with a :class:`WeightedDistributedSampler` (other settings kept).

    For ``trainer.fit(model, train_dataloaders=weighted_dataloader(loader))``. Under DDP build it where
    the rank is known (e.g. in ``LightningModule.train_dataloader`` with ``num_replicas=self.trainer.
    world_size, rank=self.trainer.global_rank``). Its state is not checkpointed by Lightning: save
    ``loader.sampler.state_dict()`` yourself, or use :class:`PatterningDataModule`.

    Args:
        loader: a DataLoader over a map-style dataset with ``__len__``.
        weights: per-sample weights (per-group with ``groups``), any positive scale; default ``initial_mass``.
        groups: a sample field / dataset attribute name, or one group id per sample.
        num_replicas: number of ranks. rank: this rank.
        replacement: with or without replacement. chunk_size: indices per rank drawn at a time.
        seed: seed of the draw.
        initial_mass: without ``weights``: ``"natural"`` (mass proportional to group size) or ``"equal"``.

    Raises:
        TypeError: ``loader`` is not a DataLoader over a map-style dataset with ``__len__``.
    """
    dataset = _check_loader(loader, "loader")
    sampler = WeightedDistributedSampler(
        dataset,
        weights=weights,
        groups=resolve_groups(dataset, groups),
        num_replicas=num_replicas,
        rank=rank,
        seed=seed,
        replacement=replacement,
        chunk_size=chunk_size,
        initial_mass=initial_mass,
    )
    return _rebuild(loader, sampler)


def resolve_groups(dataset: Dataset[Any], groups: str | Sequence[int] | Tensor | None) -> Tensor | None:
    """Group ids per sample: given directly, a sequence attribute of the dataset, or a field of dict samples.

    ``Subset`` datasets are looked through (``dataset.dataset.<name>[indices]``).

    Raises:
        ValueError: the name is neither an attribute nor a field of every sample.
    """
    if groups is None or not isinstance(groups, str):
        return None if groups is None else validate_groups(groups, len(dataset))  # type: ignore[arg-type]
    source, indices = dataset, None
    if isinstance(dataset, Subset) and not hasattr(dataset, groups):
        source, indices = dataset.dataset, list(dataset.indices)
    values = getattr(source, groups, None)
    if values is not None and not callable(values):
        ids = torch.as_tensor(values)
        return validate_groups(ids if indices is None else ids[indices], len(dataset))  # type: ignore[arg-type]
    ids = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[i]
        if not isinstance(sample, dict) or groups not in sample:
            raise ValueError(
                f"groups={groups!r} is neither an attribute of {type(dataset).__name__} nor a key of"
                f" its samples (sample {i} is a {type(sample).__name__})"
            )
        ids.append(int(sample[groups]))
    return validate_groups(ids, len(dataset))  # type: ignore[arg-type]


def _check_loader(loader: object, what: str) -> Dataset[Any]:
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{what} must return a torch DataLoader for weighted sampling, got {type(loader).__name__}"
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError(f"{what} is over an IterableDataset; weighted sampling needs a map-style dataset")
    if not isinstance(dataset, Sized):
        raise TypeError(
            f"{what} is over {type(dataset).__name__}, which has no __len__; weighted sampling needs it"
        )
    if loader.batch_size is None and loader.batch_sampler is not None:
        raise ValueError(f"{what} uses a custom batch_sampler; give it batch_size=... and no batch_sampler")
    if not isinstance(loader.sampler, SequentialSampler | RandomSampler | WeightedDistributedSampler):
        warnings.warn(
            f"{what}: its {type(loader.sampler).__name__} is replaced by the weighted sampler", stacklevel=3
        )
    return dataset


def _rebuild(loader: DataLoader, sampler: WeightedDistributedSampler) -> DataLoader:
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
        in_order=loader.in_order,
    )


def _num_weights(dataset: Sized, groups: Tensor | None) -> int:
    return len(dataset) if groups is None else int(groups.max()) + 1


def _same_layout(
    sampler: WeightedDistributedSampler, dataset: Sized, groups: Tensor | None, num_replicas: int, rank: int
) -> bool:
    same_groups = (groups is None and sampler.groups is None) or (
        groups is not None and sampler.groups is not None and torch.equal(groups, sampler.groups)
    )
    return (
        len(dataset) == sampler.dataset_length
        and same_groups
        and (num_replicas, rank)
        == (
            sampler.num_replicas,
            sampler.rank,
        )
    )
