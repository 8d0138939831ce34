"""Adapters between a Lightning Trainer and the functional core: module, loss, data, ranks, reductions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

from lightning_patterning.sgld.functional import LossFn, unwrap_module

_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel", "XLA")


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Refuse sharded strategies (FSDP, DeepSpeed, model-parallel) clearly at setup."""
    name = type(trainer.strategy).__name__
    if any(bad.lower() in name.lower() for bad in _UNSUPPORTED_STRATEGIES):
        raise MisconfigurationException(
            f"{owner} does not support the {name} strategy yet (parameters are sharded across ranks). "
            "Use a single device, 'ddp' or 'ddp_spawn'."
        )


def estimation_module(trainer: pl.Trainer) -> nn.Module:
    """The LightningModule itself, never the DDP wrapper, and without a ``torch.compile`` wrapper."""
    return unwrap_module(trainer.lightning_module)


def resolve_loss_fn(pl_module: pl.LightningModule, loss_fn: LossFn | None, owner: str) -> LossFn:
    """``loss_fn`` if given, else ``module.per_sample_loss(batch)``; otherwise say exactly what to add."""
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "per_sample_loss", None)):
        return _call_per_sample_loss
    raise MisconfigurationException(
        f"{owner} needs per-sample losses: add a method `def per_sample_loss(self, batch) -> Tensor` "
        f"returning one loss per sample (shape [batch]; or per token, [batch, T], optionally as a pair "
        f"(losses, mask)) to {type(pl_module).__name__}, or pass `loss_fn=fn` with "
        f"`fn(module, batch) -> Tensor[batch]` to {owner}."
    )


def _call_per_sample_loss(module: nn.Module, batch: Any) -> torch.Tensor:
    return module.per_sample_loss(batch)  # type: ignore[operator]


def sgld_dataloader(trainer: pl.Trainer, dataloader: DataLoader | None, owner: str) -> DataLoader:
    """The data SGLD draws minibatches from: ``dataloader`` or the Trainer's training dataloader."""
    if dataloader is not None:
        return dataloader
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        return loader
    raise MisconfigurationException(
        f"{owner} draws SGLD minibatches from the training DataLoader, but the Trainer has "
        f"{type(loader).__name__}; pass `dataloader=` to {owner}."
    )


def local_chain_ids(num_chains: int, trainer: pl.Trainer) -> list[int]:
    """Chains run by this rank: ``c ≡ rank (mod world size)``. A rank may get none."""
    return [c for c in range(num_chains) if c % trainer.world_size == trainer.global_rank]


class StrategySum:
    """Sums a tensor over the Trainer's processes (every rank must call it, in the same order)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._strategy = trainer.strategy
        self.device = trainer.strategy.root_device

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._strategy.world_size == 1:
            return tensor
        return self._strategy.reduce(tensor.to(self.device), reduce_op="sum")


def forward_context(trainer: pl.Trainer) -> Callable[[], AbstractContextManager[Any]]:
    """The Trainer's precision context (autocast etc.), so SGLD forwards match training precision."""
    return trainer.precision_plugin.forward_context
