"""Calling a module at substituted parameters without touching the live module's state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(module, batch) -> Tensor[B]``: one loss per sample of the batch."""

PREFIX = "model."


class LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``torch.func.functional_call`` can swap the
    model's parameters (names get the prefix ``"model."``)."""

    def __init__(self, model: nn.Module, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self._fn(self.model, *args)


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module itself, without a ``torch.compile`` (``_orig_mod``) or DDP (``.module``) wrapper."""
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (dropout off, BatchNorm on running statistics), then restore
    each submodule's own ``training`` flag exactly as it was."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def check_per_sample_losses(losses: object, batch_size: int, argument: str = "loss_fn") -> torch.Tensor:
    """Validate the output of a per-sample loss function: a floating tensor of shape ``[batch_size]``."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{argument} must return a Tensor of per-sample losses, got {type(losses).__name__}")
    if losses.ndim != 1 or losses.shape[0] != batch_size:
        raise ValueError(
            f"{argument} must return per-sample losses of shape [batch] = [{batch_size}], got shape "
            f"{list(losses.shape)}; reduce any extra dimensions (e.g. per-token losses: .mean(dim=1)) "
            "and do not average over the batch"
        )
    if not losses.is_floating_point():
        raise TypeError(f"{argument} must return floating-point losses, got dtype {losses.dtype}")
    return losses
