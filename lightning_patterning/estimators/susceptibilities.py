"""Susceptibilities: how posterior expectations of observables respond to shifts of the data
(docs/concepts/susceptibilities.md).

For a probe sample z and an observable φ, with ``L`` the loss on a fixed set of training batches,

    χ_z(φ) = (1/nβ)·∂⟨φ⟩_h/∂h |_{h=0} = −Cov_posterior[ φ(w), ℓ_z(w) − L(w) ]

(χ > 0: shifting data weight toward z raises ⟨φ⟩; the raw Jacobian ∂⟨φ⟩/∂h is ``−nβ·Cov``). For a
weight-restricted component C, devinterp's two-chain estimator (``compute_susceptibilities``) with
``g = L(w) − L(w*)`` on the chain restricted to C:

    χ̃^C_z = E_C[ g·(L − ℓ_z) ] − E_C[g]·( E_full[L] − E_full[ℓ_z] )

Tokens as samples: a ``loss_fn`` that returns per-position losses ``[B, T]`` (optionally with a mask of the
positions that are samples) makes every valid (probe sample, position) pair a column, ``ℓ_z`` with
``z = (n, t)``; ``L`` is then the mean over the valid positions of the fixed batches, and the matrix is
``[k, N, T]`` with NaN at invalid positions (``estimators.columns``).

Draws of all chains are pooled through running sums (memory O(k·N), never O(draws·N)); the standard error
is a jackknife over chains (leave one chain out). It does not cover the choice of the fixed loss batches
that define ``L``: a different batch set shifts every column of a row by about the same amount (use more
``loss_batches`` to shrink that shift).

Cost: at every draw each chain evaluates the whole probe set and the loss batches (forwards only, all chains
of a restriction in one vmapped call; parameters outside a restriction are not stacked, so the part of the
forward before the first sampled parameter is computed once for all chains). With a probe much larger than
a minibatch this dominates the SGLD steps, so thinning (``SGLDConfig.steps_between_draws = k``) divides the
time almost by k at the same number of SGLD steps; draws closer than the chains' autocorrelation time add
little information (docs/benchmarks.md, "Susceptibilities vs devinterp").

Sources: Baker et al. arXiv 2504.18274 (App. C.4); Kreer et al. arXiv 2509.26544; devinterp 2.0.1
``devinterp/slt/susceptibilities.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_patterning.estimators.columns import LossOutput, ProbeColumns, TokenGroupSpec, batch_means
from lightning_patterning.estimators.llc import AllReduce
from lightning_patterning.estimators.probe import GroupSpec, ProbeSet
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.estimators.streaming import FullChainSums, RestrictedChainSums, reduce_sums
from lightning_patterning.observables import LLC, Custom, Observable, ProbeLoss, Restricted, check_observables
from lightning_patterning.sgld.batches import Batch, SampleSource, reference_indices
from lightning_patterning.sgld.chains import ChainRunner, DrawRecord, ForwardContext, Progress
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import check_finite_at_checkpoint, warn_non_finite
from lightning_patterning.sgld.functional import LossFn, check_loss_output
from lightning_patterning.sgld.restrict import ParamMasks, resolve_param_masks


def estimate_susceptibilities(
    model: nn.Module,
    loss_fn: LossFn,
    dataloader: DataLoader | Dataset,
    config: SGLDConfig,
    observables: Sequence[Observable],
    probe: Dataset | DataLoader,
    *,
    probe_indices: Sequence[int] | None = None,
    groups: GroupSpec = None,
    token_groups: TokenGroupSpec = None,
    loss_batches: int = 4,
    probe_batch_size: int = 256,
    chain_ids: Sequence[int] | None = None,
    run: int = 0,
    all_reduce: AllReduce | None = None,
    forward_context: ForwardContext | None = None,
    progress: Progress = False,
) -> Susceptibilities:
    """Estimate the susceptibility matrix ``χ`` [observables × probe samples or groups] at the current
    weights (``[observables, N, T]`` for per-position losses: tokens as samples).

    Args:
        model: the module at the checkpoint ``w*`` (never modified).
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]`` per-sample losses; or per-position losses
            ``Tensor[B, T]``, or ``(Tensor[B, T], BoolTensor[B, T])`` with a mask that is True at the
            positions that are samples (it must depend on the batch only, not on the weights). Then every
            valid (probe sample, position) is a column; all probe batches must share one ``T``.
        dataloader: training data for SGLD minibatches and for the fixed loss batches of ``L``.
        config: sampler settings (one chain set per ``Restricted`` observable plus the unrestricted one).
        observables: ``ProbeLoss``, ``LLC``, ``Restricted``, ``Custom`` instances (unique names).
        probe: the samples of the data axis (a ``Subset`` of the training set keeps training indices).
        probe_indices: select these indices of ``probe``.
        groups: aggregate columns into groups (field name, labels, or ``fn(sample)``); ``χ_g`` is the
            mean of ``χ_z`` over the group's members (with per-position losses: over the valid tokens
            of the group's samples).
        token_groups: per-position losses only: a label per token, ``LongTensor[N, T]`` or
            ``fn(batch) -> LongTensor[B, T]`` on each collated probe batch; columns are then the labels
            (sorted), ``χ_g`` the mean of ``χ_z`` over the valid tokens labelled ``g``.
        loss_batches: minibatches of ``config.batch_size`` forming the fixed set on which ``L(w)`` is
            measured.
        probe_batch_size: batch size of the probe forwards (per chain; a forward holds activations for
            ``num_chains × probe_batch_size`` samples: on CPU, smaller batches that stay in cache can be
            faster, e.g. 64).
        chain_ids: chains run by this process (as in ``estimate_llc``).
        run: index of this estimation, mixed into the seeds.
        all_reduce: sums a tensor over processes.
        forward_context: factory of a context manager around forwards.
        progress: show progress bars: ``True``, a label, or a ``ProgressFn`` (see ``ChainRunner``).

    Chains whose loss or gradient becomes non-finite are dropped (one ``NonFiniteLossWarning`` per call).

    Raises:
        NonFiniteCheckpointError: at the checkpoint, a sample of the fixed loss batches or of the probe has
            a non-finite loss (the message says whether the weights or the data are the cause).
    """
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    if not isinstance(loss_batches, int) or loss_batches < 1:
        raise ValueError(f"loss_batches must be an int >= 1, got {loss_batches!r}")
    observables = check_observables(observables)
    restricted_masks = {o.name: restriction_masks(model, o) for o in observables if isinstance(o, Restricted)}
    probe_set = ProbeSet(probe, probe_indices, groups, probe_batch_size)
    source = SampleSource(dataloader)
    fixed_ids = reference_indices(source.size, config.batch_size, loss_batches, config.seed, run)
    fixed = [source.fetch(indices) for indices in fixed_ids]
    plain = [o for o in observables if not o.restricted]
    plain_data = {o.name: _probe_loss_batches(o, probe_batch_size) for o in plain if isinstance(o, ProbeLoss)}

    # The chains' own minibatch losses at w* (``DrawRecord.center_loss``, the paired LLC estimator) are never
    # used here: skip that forward at every draw.
    chain_config = replace(config, paired=False)

    def runner(masks: ParamMasks, index: int) -> ChainRunner:
        return ChainRunner(
            model,
            loss_fn,
            source,
            chain_config,
            masks,
            chain_ids=chain_ids,
            run=run * 1000 + index,
            forward_context=forward_context,
            progress=progress,
        )

    full_runner = runner(resolve_param_masks(model, None), 0)
    fixed_outputs = [_center_output(full_runner, b, "loss_fn (loss batches)", True) for b in fixed]
    for (losses, mask), ids in zip(fixed_outputs, fixed_ids, strict=True):
        check_finite_at_checkpoint(model, _valid(losses, mask), ids, "the SGLD data")
    fixed_masks = [mask for _, mask in fixed_outputs]
    center_loss = float(batch_means([(losses.unsqueeze(0), mask) for losses, mask in fixed_outputs])[0])
    probe_outputs = [_center_output(full_runner, b, "loss_fn (probe)") for b in probe_set.batches]
    probe_ids = probe_set.sample_ids.split([len(losses) for losses, _ in probe_outputs])
    for (losses, mask), ids in zip(probe_outputs, probe_ids, strict=True):
        check_finite_at_checkpoint(model, _valid(losses, mask), ids, "the probe")
    columns = ProbeColumns(probe_set, probe_outputs, token_groups)
    plain_masks = {
        name: [_center_output(full_runner, b, f"loss_fn (ProbeLoss({name!r}).data)")[1] for b in batches]
        for name, batches in plain_data.items()
    }
    full = FullChainSums(full_runner.num_chains, columns.size, len(plain))
    observe = _PlainObserver(
        plain,
        plain_data,
        plain_masks,
        (fixed, fixed_masks),
        columns,
        probe_set.batches,
        center_loss,
        config.resolved_nbeta,
    )
    summary = full_runner.run(lambda record: full.add(record, *observe(record)))
    full.drop(summary.diverged)
    events = list(summary.non_finite)
    restricted: dict[str, RestrictedChainSums] = {}
    for index, (name, masks) in enumerate(restricted_masks.items(), start=1):
        sums = RestrictedChainSums(full_runner.num_chains, columns.size, center_loss)
        chains = runner(masks, index)
        outcome = chains.run(lambda record, s=sums: s.add(record, *observe.losses(record)))
        sums.drop(outcome.diverged)
        restricted[name] = sums
        events += outcome.non_finite
    warn_non_finite(events, "estimate_susceptibilities", config.num_chains * (1 + len(restricted_masks)))
    return reduce_sums(
        full,
        restricted,
        observables,
        plain,
        columns,
        full_runner.chain_ids,
        config,
        center_loss,
        all_reduce or (lambda t: t),
    )


class _PlainObserver:
    """Evaluates at a draw: ``L`` on the fixed batches, the probe losses ``ℓ_z``, the plain observables."""

    def __init__(
        self,
        plain: list[Observable],
        plain_data: dict[str, list[Batch]],
        plain_masks: dict[str, list[torch.Tensor | None]],
        fixed: tuple[list[Batch], list[torch.Tensor | None]],
        columns: ProbeColumns,
        probe_batches: list[Batch],
        center_loss: float,
        nbeta: float,
    ) -> None:
        self.plain, self.plain_data, self.plain_masks = plain, plain_data, plain_masks
        self.fixed, self.fixed_masks = fixed
        self.columns, self.probe_batches = columns, probe_batches
        self.center_loss, self.nbeta = center_loss, nbeta

    def losses(self, record: DrawRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """``L(w_t)`` [chains] on the fixed batches and ``ℓ_z(w_t)`` [chains, columns] on the probe."""
        loss = batch_means(
            [(record.per_sample_losses(b), m) for b, m in zip(self.fixed, self.fixed_masks, strict=True)]
        )
        probe = self.columns.flatten([record.per_sample_losses(b).double() for b in self.probe_batches])
        return loss.cpu(), probe.cpu()

    def __call__(self, record: DrawRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, probe = self.losses(record)
        values = [self._value(o, record, loss) for o in self.plain]
        phi = torch.stack(values, dim=1) if values else torch.zeros(len(loss), 0, dtype=torch.float64)
        return loss, probe, phi

    def _value(self, observable: Observable, record: DrawRecord, loss: torch.Tensor) -> torch.Tensor:
        if isinstance(observable, LLC):
            return self.nbeta * (loss - self.center_loss)
        if isinstance(observable, ProbeLoss):
            batches, masks = self.plain_data[observable.name], self.plain_masks[observable.name]
            total, count = torch.zeros((), dtype=torch.float64), 0
            for batch, mask in zip(batches, masks, strict=True):
                values = record.per_sample_losses(batch).double()
                if mask is not None:
                    m = mask.to(values.device)
                    values = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
                total = total + values.flatten(1).sum(dim=1)
                count += int(mask.sum()) if mask is not None else values[0].numel()
            return (total / count).cpu()
        assert isinstance(observable, Custom)
        value = record.evaluate(observable.fn)
        if value.ndim != 1:
            raise ValueError(
                f"Custom({observable.name!r}): fn must return a scalar tensor, "
                f"got shape {list(value.shape[1:])}"
            )
        return value.double().cpu()


def restriction_masks(model: nn.Module, observable: Restricted) -> ParamMasks:
    """The parameter masks of a ``Restricted`` observable (its patterns and per-entry masks combined)."""
    argument = f"Restricted({observable.name!r})"
    masks: ParamMasks = {}
    if observable.params:
        masks.update(resolve_param_masks(model, observable.params, argument=argument))
    if observable.masks:
        masks.update(resolve_param_masks(model, observable.masks, argument=argument))
    return masks


def _probe_loss_batches(observable: ProbeLoss, batch_size: int) -> list[Batch]:
    source = SampleSource(observable.data, argument=f"ProbeLoss({observable.name!r}).data")
    count = source.size if observable.max_samples is None else min(source.size, observable.max_samples)
    return [source.fetch(chunk) for chunk in torch.arange(count).split(batch_size)]


def _batch_length(batch: Batch) -> int:
    leaves = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    )
    return next(int(leaf.shape[0]) for leaf in leaves if isinstance(leaf, torch.Tensor))


def _center_output(
    runner: ChainRunner, batch: Batch, argument: str, require_valid: bool = False
) -> LossOutput:
    """The validated ``(losses, mask)`` of ``batch`` at ``w*`` (the mask is reused at every draw)."""
    losses, mask = check_loss_output(
        runner.center_call(batch), _batch_length(batch), argument, require_valid=require_valid
    )
    return losses.detach().cpu(), None if mask is None else mask.detach().cpu()


def _valid(losses: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``losses`` with masked-out positions set to 0 (only samples are checked for finiteness)."""
    return losses if mask is None else torch.where(mask, losses, losses.new_zeros(()))
