"""The check every SGLD run starts with: ``loss_fn`` at the checkpoint on one minibatch.

It validates the output of ``loss_fn`` (per-sample losses, floating point), gives the reference loss of
the divergence check and the FLOPs of one chain's forward (``chain_mode="auto"``'s size rule), and finds
non-finite losses at ``w*`` (``sgld.divergence``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from lightning_patterning.sgld.batches import ChainBatches, SampleSource, batch_to, chain_slice
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import check_finite_at_checkpoint, non_finite_rows
from lightning_patterning.sgld.functional import (
    PREFIX,
    LossFn,
    LossModule,
    check_loss_output,
    evaluation_mode,
    masked_mean,
)

ForwardContext = Callable[[], AbstractContextManager[Any]]


class LossCheck(NamedTuple):
    """What ``check_loss_fn`` measured at the checkpoint: the mean minibatch loss (over its finite
    per-sample losses), the FLOPs of that forward (matmul, convolution, attention;
    ``torch.utils.flop_counter``) and the dataset indices of samples whose loss was non-finite."""

    loss: float
    flops: int
    non_finite: tuple[int, ...] = ()


@torch.no_grad()
def check_loss_fn(
    model: nn.Module,
    loss_fn: LossFn,
    source: SampleSource,
    config: SGLDConfig,
    forward_context: ForwardContext | None = None,
    count_flops: bool = False,
) -> LossCheck:
    """Run ``loss_fn`` on one minibatch at the checkpoint (eval mode, no grad) and check its output
    (``check_loss_output``: ``[batch_size]`` or ``[batch_size, T]``, optionally with a position mask)
    and that it is finite at the valid positions. Returns the mean of the finite samples' losses, with
    ``count_flops`` the forward's FLOPs (else 0), and the indices of samples with a non-finite loss (the
    chains that draw them will be dropped).

    Raises:
        NonFiniteCheckpointError: the weights are non-finite, or every loss of the minibatch is (a
            ``ValueError`` that says which).
    """
    batch_size = min(config.batch_size, source.size)
    stream = ChainBatches(source, batch_size, [0], config.seed, -1)
    device = next(model.parameters()).device
    batch = batch_to(chain_slice(stream.next_stacked(), 0), device)
    center = {PREFIX + name: p.detach() for name, p in model.named_parameters()}
    counter = FlopCounterMode(display=False) if count_flops else None
    with evaluation_mode(model), (forward_context or nullcontext)(), counter or nullcontext():
        losses = functional_call(LossModule(model, loss_fn), center, (batch,))
    values, mask = check_loss_output(losses, batch_size)
    values = (
        values.float()
        if mask is None
        else torch.where(mask, values.float(), values.new_zeros((), dtype=torch.float32))
    )
    assert stream.last_indices is not None
    bad = check_finite_at_checkpoint(
        model, values, stream.last_indices[0], "the SGLD data", tolerate_data=True
    )
    finite = ~non_finite_rows(values).to(values.device)
    mean = float(masked_mean(values[finite], None if mask is None else mask[finite]))
    return LossCheck(mean, counter.get_total_flops() if counter is not None else 0, tuple(bad))
