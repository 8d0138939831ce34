"""The local learning coefficient (LLC) from localized SGLD chains (docs/concepts/llc.md).

Per chain, with draws ``w_1 … w_T`` and their minibatches ``B_t``:

* paired (default): ``λ̂ = nβ · mean_t[ L_{B_t}(w_t) − L_{B_t}(w*) ]``
* unpaired (devinterp):  ``λ̂ = nβ · ( mean_t L_{B_t}(w_t) − L(w*) )``, with ``L(w*)`` averaged over
  ``init_loss_batches`` minibatches.

Both have the same expectation; pairing cancels the minibatch noise of ``L_{B_t}`` at the cost of one extra
forward per draw. The estimate is the mean over non-diverged chains; ``std`` is their sample standard
deviation and ``stderr = std / √chains``; the unpaired estimator adds the uncertainty of ``L(w*)``, which
is common to all chains and so invisible in their spread: ``stderr² = std²/chains + nβ²·s²_ref/k`` with
``s_ref`` the spread of the ``k`` reference-batch losses. With per-position losses ``[B, T]`` (tokens as
samples, optionally masked) every ``L_B`` is the mean over the minibatch's valid positions.

Source: Lau et al., "The Local Learning Coefficient" (arXiv 2308.12108); devinterp 2.0.1
``devinterp/slt/llc.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_patterning.sgld.batches import SampleSource, reference_indices
from lightning_patterning.sgld.chains import ChainRunner, DrawRecord, ForwardContext, Progress
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import check_finite_at_checkpoint, warn_non_finite
from lightning_patterning.sgld.functional import LossFn, masked_mean
from lightning_patterning.sgld.restrict import RestrictSpec, resolve_param_masks

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over processes (identity in a single process)."""


@dataclass
class LLCResult:
    """An LLC estimate.

    Attributes:
        mean: mean of the per-chain estimates over non-diverged chains (NaN if all diverged).
        std: their sample standard deviation (ddof = 1; NaN with fewer than two chains).
        stderr: ``std / √(non-diverged chains)``.
        per_chain: ``[chains]`` per-chain estimates (NaN for diverged chains).
        trace: ``[chains, draws]`` minibatch loss ``L_{B_t}(w_t)`` at each draw.
        center_trace: ``[chains, draws]`` ``L_{B_t}(w*)`` on the same minibatches (paired) or ``None``.
        init_loss: ``L(w*)``: mean of ``center_trace`` (paired) or over ``init_loss_batches`` minibatches.
        nbeta: the inverse temperature used.
        diverged: ``[chains]`` True for chains dropped as diverged.
        paired: which estimator was used.
        mode: ``"vmap"`` or ``"sequential"``.
        diagnostics: ``distance`` (mean ``‖w_t − w*‖`` over chains and ~10 evenly spaced draws) and
            devinterp's update norms ``grad_norm``, ``localization_norm``, ``noise_norm`` (RMS over chains).
        config: the ``SGLDConfig`` as a dictionary.
    """

    mean: float
    std: float
    stderr: float
    per_chain: torch.Tensor
    trace: torch.Tensor
    center_trace: torch.Tensor | None
    init_loss: float
    nbeta: float
    diverged: torch.Tensor
    paired: bool
    mode: str
    diagnostics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged_chains(self) -> int:
        """Number of chains dropped as diverged."""
        return int(self.diverged.sum())

    @property
    def num_chains(self) -> int:
        return int(self.per_chain.numel())

    def scalars(self) -> dict[str, float]:
        """Flat scalar summary, e.g. for logging: mean, std, stderr, init_loss, diverged, diagnostics."""
        return {
            "mean": self.mean,
            "std": self.std,
            "stderr": self.stderr,
            "init_loss": self.init_loss,
            "diverged_chains": float(self.diverged_chains),
            **self.diagnostics,
        }


def estimate_llc(
    model: nn.Module,
    loss_fn: LossFn,
    dataloader: DataLoader | Dataset,
    config: SGLDConfig,
    restrict: RestrictSpec = None,
    *,
    chain_ids: Sequence[int] | None = None,
    run: int = 0,
    all_reduce: AllReduce | None = None,
    forward_context: ForwardContext | None = None,
    progress: Progress = False,
) -> LLCResult:
    """Estimate the (optionally weight-restricted) LLC of ``model`` at its current parameters.

    Args:
        model: the module at the checkpoint ``w*``; it is not modified (parameters, buffers, grads and
            train/eval flags are as before; the global RNG is not used).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` per-sample losses, or per-position losses
            ``Tensor[B, T]`` / ``(Tensor[B, T], mask)`` (tokens as samples). ``L_B`` is then the mean over
            the minibatch's valid positions (tokens), ``Σ m·ℓ / Σ m``, not the mean of per-sequence means.
        dataloader: a DataLoader (its dataset and ``collate_fn`` are used; chains draw their own
            minibatches of ``config.batch_size`` from private generators) or a map-style Dataset.
        config: sampler settings.
        restrict: ``None`` (all trainable parameters), glob pattern(s) on parameter names, or a mapping
            name → per-entry mask: the weight-restricted LLC ``λ̂_C``.
        chain_ids: chains run by this process (DDP splits them over ranks); default all.
        run: index of this estimation (mixed into the seeds so repeated runs use fresh randomness).
        all_reduce: sums a tensor over processes; every process then returns the same result.
        forward_context: factory of a context manager around forwards (e.g. the Trainer's precision).
        progress: show a progress bar: ``True``, a label, or a ``ProgressFn`` (see ``ChainRunner``).

    Returns:
        An ``LLCResult``. Chains whose loss or gradient became non-finite are dropped like diverged ones,
        with one ``NonFiniteLossWarning`` naming the step and the samples.

    Raises:
        NonFiniteCheckpointError: the loss at the checkpoint itself is non-finite (a ``ValueError`` that
            says whether the weights or the data are the cause).
    """
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(module, batch) -> Tensor[B], got {loss_fn!r}")
    masks = resolve_param_masks(model, restrict)
    source = SampleSource(dataloader)
    runner = ChainRunner(
        model,
        loss_fn,
        source,
        config,
        masks,
        chain_ids=chain_ids,
        run=run,
        forward_context=forward_context,
        progress=progress,
    )
    recorder = _LLCRecorder(runner.num_chains, config.num_draws, config.paired)
    summary = runner.run(recorder)  # a rank with no chains only validates and joins the reduction
    warn_non_finite(summary.non_finite, "estimate_llc", config.num_chains)
    reference = None if config.paired else _reference_losses(runner, source, config, run)
    return _assemble(
        recorder,
        summary.diverged,
        summary.mode,
        summary.diagnostics,
        runner.chain_ids,
        config,
        reference,
        all_reduce or (lambda t: t),
    )


class _LLCRecorder:
    """Streams the per-draw losses of the local chains into ``[chains, draws]`` traces."""

    def __init__(self, chains: int, draws: int, paired: bool) -> None:
        self.trace = torch.zeros(chains, draws, dtype=torch.float64)
        self.center = torch.zeros(chains, draws, dtype=torch.float64) if paired else None
        self.distance = torch.zeros(chains, dtype=torch.float64)
        self.distance_samples = 0

    def __call__(self, record: DrawRecord) -> None:
        self.trace[:, record.draw] = record.loss.detach().cpu().double()
        if self.center is not None and record.center_loss is not None:
            self.center[:, record.draw] = record.center_loss.detach().cpu().double()
        if record.distance is not None:
            self.distance += record.distance.detach().cpu().double()
            self.distance_samples += 1


@torch.no_grad()
def _reference_losses(
    runner: ChainRunner, source: SampleSource, config: SGLDConfig, run: int
) -> torch.Tensor:
    """``[init_loss_batches]`` minibatch losses at ``w*``, from a stream shared by all processes (each
    checked to be finite)."""
    losses = []
    for indices in reference_indices(
        source.size, config.batch_size, config.init_loss_batches, config.seed, run
    ):
        values, mask = _float(runner.center_output(source.fetch(indices)))
        valid = values if mask is None else torch.where(mask, values, values.new_zeros(()))
        check_finite_at_checkpoint(runner.model, valid, indices, "the SGLD data")
        losses.append(masked_mean(values, mask))
    return torch.stack(losses).double().cpu()


def _assemble(
    recorder: _LLCRecorder,
    diverged_local: torch.Tensor,
    mode: str,
    diagnostics_local: dict[str, float],
    chain_ids: list[int],
    config: SGLDConfig,
    reference: torch.Tensor | None,
    all_reduce: AllReduce,
) -> LLCResult:
    """Place the local chains' rows into global ``[num_chains, ...]`` tensors, sum over processes,
    and compute the estimate (identical on every process)."""
    total, draws = config.num_chains, config.num_draws
    rows = torch.tensor(chain_ids, dtype=torch.long)
    local_chains = len(chain_ids)
    width = 2 * draws + 2
    packed = torch.zeros(total, width, dtype=torch.float64)
    packed[rows, :draws] = recorder.trace
    if recorder.center is not None:
        packed[rows, draws : 2 * draws] = recorder.center
    packed[rows, 2 * draws] = diverged_local.double()
    packed[rows, 2 * draws + 1] = recorder.distance / max(recorder.distance_samples, 1)
    names = ["grad_norm", "localization_norm", "noise_norm"]
    extras = torch.tensor(
        [diagnostics_local.get(n, 0.0) ** 2 * local_chains for n in names], dtype=torch.float64
    )
    flat = torch.cat([packed.flatten(), extras])
    flat = all_reduce(flat.to(_reduce_device(all_reduce))).cpu().double()
    packed = flat[: total * width].reshape(total, width)
    extras = flat[total * width :]

    trace = packed[:, :draws]
    center = packed[:, draws : 2 * draws] if config.paired else None
    diverged = packed[:, 2 * draws] > 0.5
    distance = packed[:, 2 * draws + 1]
    nbeta = config.resolved_nbeta
    if center is not None:
        per_chain = nbeta * (trace - center).mean(dim=1)
        init_loss = float(center[~diverged].mean()) if bool((~diverged).any()) else math.nan
    else:
        assert reference is not None
        init_loss = float(reference.mean())
        per_chain = nbeta * (trace.mean(dim=1) - init_loss)
    per_chain = torch.where(diverged, torch.full_like(per_chain, math.nan), per_chain)
    valid = per_chain[~diverged]
    mean = float(valid.mean()) if valid.numel() else math.nan
    std = float(valid.std(unbiased=True)) if valid.numel() > 1 else math.nan
    stderr = std / math.sqrt(valid.numel()) if valid.numel() > 1 else math.nan
    if reference is not None and reference.numel() > 1:
        stderr = math.sqrt(stderr**2 + nbeta**2 * float(reference.var()) / reference.numel())
    diagnostics = {n: math.sqrt(float(v) / total) for n, v in zip(names, extras, strict=True)}
    diagnostics["distance"] = float(distance[~diverged].mean()) if valid.numel() else math.nan
    return LLCResult(
        mean=mean,
        std=std,
        stderr=stderr,
        per_chain=per_chain.float(),
        trace=trace.float(),
        center_trace=None if center is None else center.float(),
        init_loss=init_loss,
        nbeta=nbeta,
        diverged=diverged,
        paired=config.paired,
        mode=mode,
        diagnostics=diagnostics,
        config=config.to_dict(),
    )


def _float(output: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return output[0].float(), output[1]


def _reduce_device(all_reduce: AllReduce) -> torch.device:
    return getattr(all_reduce, "device", torch.device("cpu"))
