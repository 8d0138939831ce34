"""Non-finite values in SGLD: what a chain reports when it drops out, and the check at the checkpoint.

A chain whose minibatch loss or gradient is non-finite is *diverged* (docs/concepts/llc.md): it is parked
at ``w*``, never stepped again, dropped from the estimate and counted. The chain runner records a
``NonFiniteEvent`` for it (the step, the draw, the value and the dataset indices of the samples involved)
and the estimators turn the events of one estimate into one warning (``warn_non_finite``).

A non-finite loss at the checkpoint itself can leave nothing to estimate: when the weights are non-finite,
or when a sample that enters every draw is (the fixed loss batches and the probe of a susceptibility
estimate, the reference batches of the unpaired LLC). ``NonFiniteCheckpointError`` then says whether the
weights (a parameter or buffer holds NaN/inf) or the data (some samples' losses are non-finite at finite
weights) are the cause; the callbacks catch it and skip that estimate. A non-finite sample that only some
chains draw drops those chains and nothing else.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

_SHOWN = 8  # indices quoted in a message


class NonFiniteLossWarning(RuntimeWarning):
    """SGLD chains were dropped because their loss or gradient was non-finite."""


class NonFiniteCheckpointError(ValueError):
    """The loss at the checkpoint ``w*`` is non-finite, so no estimate can be made there.

    Attributes:
        cause: ``"weights"`` (a parameter or floating buffer of the module is non-finite) or ``"data"``.
        sample_ids: dataset indices of the samples whose loss is non-finite (``cause == "data"``).
    """

    def __init__(self, message: str, cause: Literal["weights", "data"], sample_ids: list[int]) -> None:
        super().__init__(message)
        self.cause = cause
        self.sample_ids = sample_ids


@dataclass(frozen=True)
class NonFiniteEvent:
    """Chain ``chain`` met a non-finite ``what`` at SGLD ``step`` (``draw``: the draw taken at that step,
    or ``None`` during burn-in / between draws).

    Attributes:
        what: ``"loss"`` (the chain's minibatch loss at ``w_t``), ``"gradient"`` (finite loss, non-finite
            gradient) or ``"center loss"`` (the paired estimator's ``L_{B_t}(w*)``).
        value: the minibatch mean loss at that step.
        sample_ids: dataset indices of the samples whose own loss was non-finite (empty if none stood out,
            e.g. for a gradient).
        batch_ids: dataset indices of the chain's whole minibatch.
    """

    chain: int
    step: int
    draw: int | None
    what: str
    value: float
    sample_ids: tuple[int, ...]
    batch_ids: tuple[int, ...]

    def describe(self) -> str:
        where = f"step {self.step}" + (f" (draw {self.draw})" if self.draw is not None else " (burn-in)")
        text = f"chain {self.chain}: non-finite {self.what} at {where}, minibatch loss {self.value}"
        if self.sample_ids:
            text += f", from samples {_quote(self.sample_ids)} of the SGLD data"
        elif self.batch_ids:
            text += f"; its minibatch held samples {_quote(self.batch_ids)}"
        return text


def non_finite_events(
    chain_ids: Sequence[int],
    batch_ids: torch.Tensor,
    step: int,
    draw: int | None,
    loss: torch.Tensor,
    per_sample: torch.Tensor,
    finite_gradients: torch.Tensor,
    center_samples: torch.Tensor | None,
    flagged: torch.Tensor,
) -> list[NonFiniteEvent]:
    """One ``NonFiniteEvent`` per ``flagged`` chain whose loss, gradient or paired loss at ``w*`` is
    non-finite (a chain flagged only for exceeding the divergence threshold gets none).

    Args:
        chain_ids: global chain index of each local chain.
        batch_ids: ``[chains, B]`` dataset indices of each chain's minibatch at this step.
        step: the SGLD step.
        draw: the draw taken at that step (``None``: not a draw step).
        loss: ``[chains]`` minibatch mean losses.
        per_sample: ``[chains, B, ...]`` per-sample losses.
        finite_gradients: ``[chains]`` whether each chain's gradient is finite.
        center_samples: ``[chains, B, ...]`` per-sample losses at ``w*`` (paired draws) or ``None``.
        flagged: ``[chains]`` the chains to describe.
    """
    finite_loss = torch.isfinite(loss).cpu()
    events = []
    for c in torch.nonzero(flagged).flatten().tolist():
        row = batch_ids[c]
        if not finite_loss[c]:
            what, samples = "loss", non_finite_rows(per_sample[c])
        elif not finite_gradients[c]:
            what, samples = "gradient", torch.zeros(len(row), dtype=torch.bool)
        elif center_samples is not None and bool(non_finite_rows(center_samples[c]).any()):
            what, samples = "loss at w* (paired estimator)", non_finite_rows(center_samples[c])
        else:  # over the divergence threshold: counted, not a non-finite value
            continue
        events.append(
            NonFiniteEvent(
                chain=chain_ids[c],
                step=step,
                draw=draw,
                what=what,
                value=float(loss[c]),
                sample_ids=tuple(row[samples].tolist()),
                batch_ids=tuple(row.tolist()),
            )
        )
    return events


def warn_non_finite(events: Sequence[NonFiniteEvent], owner: str, chains: int) -> None:
    """One ``NonFiniteLossWarning`` describing every event of an estimate (nothing if there is none)."""
    if not events:
        return
    lines = "; ".join(e.describe() for e in events[:_SHOWN])
    more = f"; and {len(events) - _SHOWN} more" if len(events) > _SHOWN else ""
    data_hint = any(e.sample_ids for e in events)
    hint = (
        "check those samples of the data for NaN/inf (inputs or targets)"
        if data_hint
        else "check the data for NaN/inf, or lower SGLDConfig.lr / raise localization"
    )
    warnings.warn(
        f"{owner}: {len(events)} of {chains} SGLD chains were dropped as diverged because of a non-finite "
        f"value ({lines}{more}); {hint}.",
        NonFiniteLossWarning,
        stacklevel=3,
    )


def non_finite_rows(losses: torch.Tensor) -> torch.Tensor:
    """``[B]`` (CPU) True for the samples (rows) of ``losses`` ``[B, ...]`` with a non-finite entry."""
    finite = torch.isfinite(losses.detach())
    return ~finite.reshape(finite.shape[0], -1).all(dim=1).cpu()


def non_finite_state(module: nn.Module) -> list[str]:
    """Names of the parameters and floating-point buffers of ``module`` that hold NaN or inf."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return [
        name
        for name, tensor in named
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())
    ]


def check_finite_at_checkpoint(
    module: nn.Module,
    losses: torch.Tensor,
    sample_ids: torch.Tensor,
    where: str,
    tolerate_data: bool = False,
) -> list[int]:
    """Check the per-sample ``losses`` at ``w*``; return the dataset indices of the non-finite ones.

    Args:
        module: the module at the checkpoint (inspected to tell the weights from the data).
        losses: ``[B, ...]`` per-sample losses at ``w*``.
        sample_ids: ``[B]`` dataset indices of those samples.
        where: what the samples are, for the message (e.g. ``"the SGLD data"``, ``"the probe"``).
        tolerate_data: return the indices of non-finite samples instead of raising, as long as the weights
            are finite and some sample is finite (a chain that draws such a sample is dropped later).

    Raises:
        NonFiniteCheckpointError: a loss is non-finite and the weights are (``cause="weights"``), or the
            data is (``cause="data"``) and ``tolerate_data`` does not apply.
    """
    bad = non_finite_rows(losses)
    if not bool(bad.any()):
        return []
    broken = non_finite_state(module)
    if broken:
        raise NonFiniteCheckpointError(
            f"the loss at the checkpoint is non-finite because the weights are non-finite: {_quote(broken)} "
            "hold NaN/inf (training itself has diverged; lower the learning rate or clip gradients)",
            "weights",
            [],
        )
    ids = [int(i) for i in sample_ids.reshape(-1).cpu()[bad].tolist()]
    if tolerate_data and not bool(bad.all()):
        return ids
    raise NonFiniteCheckpointError(
        f"the weights are finite but samples {_quote(ids)} of {where} have a non-finite loss at the "
        "checkpoint: the data holds NaN/inf (check those samples' inputs and targets)",
        "data",
        ids,
    )


def _quote(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    if len(items) > _SHOWN:
        return f"[{shown}, ...] ({len(items)} in all)"
    return f"[{shown}]"
