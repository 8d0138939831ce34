"""Calling a module at substituted parameters without touching the live module's state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], Any]
"""``loss_fn(module, batch)``: one loss per sample, ``Tensor[B]``; or one loss per position,
``Tensor[B, T]`` (tokens as samples); or ``(Tensor[B, T], BoolTensor[B, T])``, per-position losses and a
mask that is True at the positions that are samples (False: padding, positions to ignore). See
``split_loss_output``."""

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


def split_loss_output(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(losses, mask)`` from what a loss function returned: a tensor (``mask = None``: every entry is a
    sample) or a pair ``(losses, mask)``. No checks, so it runs inside ``vmap`` (``check_loss_output``
    validates once, outside)."""
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return output[0], output[1]
    return output, None


def check_loss_output(
    output: object, batch_size: int, argument: str = "loss_fn", require_valid: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a loss function's output on a batch of ``batch_size`` samples.

    Allowed: a floating tensor ``[batch_size]`` (per-sample losses) or ``[batch_size, T]`` (per-position
    losses, every position a sample), or a pair ``(losses [batch_size, T], mask [batch_size, T])`` with a
    boolean ``mask`` that is True at the positions that are samples and (``require_valid``) True somewhere
    in the batch.

    Returns:
        ``(losses, mask)`` with ``mask = None`` when every entry is a sample.

    Raises:
        TypeError: not a tensor or pair of tensors, non-floating losses, non-boolean mask.
        ValueError: a shape other than the above, or a mask with no valid position.
    """
    losses, mask = split_loss_output(output)
    if isinstance(output, (tuple, list)) and len(output) != 2:
        raise TypeError(
            f"{argument} must return per-sample losses Tensor[B], per-position losses Tensor[B, T], or a "
            f"pair (losses Tensor[B, T], mask BoolTensor[B, T]); got a {type(output).__name__} of "
            f"{len(output)} items"
        )
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{argument} must return a Tensor of per-sample losses, got {type(losses).__name__}")
    if losses.ndim not in (1, 2) or losses.shape[0] != batch_size:
        raise ValueError(
            f"{argument} must return per-sample losses of shape [batch] = [{batch_size}] or per-position "
            f"losses of shape [batch, T] = [{batch_size}, T] (tokens as samples), got shape "
            f"{list(losses.shape)}; do not average over the batch"
        )
    if not losses.is_floating_point():
        raise TypeError(f"{argument} must return floating-point losses, got dtype {losses.dtype}")
    if mask is None:
        return losses, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{argument}: the mask of (losses, mask) must be a BoolTensor, got {type(mask).__name__}"
        )
    if losses.ndim != 2 or mask.shape != losses.shape:
        raise ValueError(
            f"{argument}: the mask of (losses, mask) must have the shape of per-position losses [B, T]; got "
            f"losses {list(losses.shape)} and mask {list(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{argument}: the mask of (losses, mask) must be boolean (True = a sample), got {mask.dtype}"
        )
    if require_valid and not bool(mask.any()):
        raise ValueError(
            f"{argument}: the mask marks no valid position in a batch of {batch_size} samples; at least one "
            "position must be True (a sample)"
        )
    return losses, mask


def check_per_sample_losses(losses: object, batch_size: int, argument: str = "loss_fn") -> torch.Tensor:
    """Validate a loss function's output (see ``check_loss_output``) and return the losses only."""
    return check_loss_output(losses, batch_size, argument)[0]


def masked_mean(losses: torch.Tensor, mask: torch.Tensor | None, start_dim: int = 0) -> torch.Tensor:
    """Mean of ``losses`` over dimensions ``start_dim…`` counting only entries where ``mask`` is True
    (every entry when ``mask`` is None); masked entries never enter, even when NaN.

    For per-position losses ``[B, T]`` this is the mean over the batch's valid positions (tokens),
    ``Σ_{b,t} m_{bt}·ℓ_{bt} / Σ_{b,t} m_{bt}``, not the mean of per-sequence means.
    """
    dims = tuple(range(start_dim, losses.ndim))
    if mask is None:
        return losses.mean(dim=dims)
    total = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum(dim=dims)
    return total / mask.sum(dim=dims).to(losses.dtype)
