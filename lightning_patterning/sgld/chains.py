"""The chain engine: localized SGLD chains from a snapshot of the current parameters.

All chains start at ``w*`` and take devinterp's ``SGMCMC.sgld`` / ``SGMCMC.rmsprop_sgld`` step
(docs/concepts/llc.md) with noise from a private ``torch.Generator``. In ``"vmap"`` mode the sampled
parameters
are stacked along a leading chain dimension and one ``torch.func.functional_call`` + ``vmap``
forward/backward serves every chain (the SGMCMC update is elementwise, so it applies unchanged to the
stacked tensors). ``"sequential"`` mode keeps one parameter copy and one optimizer per chain and steps them
in lockstep, for modules that cannot be vmapped.

Isolation (docs/concepts/isolation.md): the live module's parameters are only read (detached); the
chains own their
copies; forwards run in eval mode (restored afterwards) so BatchNorm statistics never change; all
randomness comes from private generators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from devinterp.optim import SGMCMC
from torch import nn
from torch.func import functional_call, vmap
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from lightning_patterning.sgld.batches import Batch, ChainBatches, SampleSource, batch_to, chain_slice
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.functional import (
    PREFIX,
    LossFn,
    LossModule,
    check_loss_output,
    evaluation_mode,
    masked_mean,
    split_loss_output,
)
from lightning_patterning.sgld.restrict import ParamMasks
from lightning_patterning.sgld.seeding import private_generator

ForwardContext = Callable[[], AbstractContextManager[Any]]

_METRIC_FIELDS = ("unscaled_grad", "localization", "noise")
_METRIC_SAMPLES = 10


@dataclass
class DrawRecord:
    """What a chain set looks like at one draw, handed to ``on_draw`` hooks.

    Attributes:
        draw: draw index, ``0 .. num_draws − 1``.
        step: SGLD step index of the draw (the draw is taken at ``w_t`` before step ``t``'s update).
        loss: ``[chains]`` minibatch mean loss ``L_{B_t}(w_t)``.
        center_loss: ``[chains]`` ``L_{B_t}(w*)`` on the same minibatch (paired estimator) or ``None``.
        active: ``[chains]`` False for chains that have diverged (their values must be ignored).
        distance: ``[chains]`` ``‖w_t − w*‖`` over the sampled entries, or ``None``: like devinterp's
            update norms it is a diagnostic measured at a few evenly spaced draws (``_METRIC_SAMPLES``),
            since a pass over all chains' parameters at every draw costs ~1 % of an SGLD step on a 1M LM.
    """

    draw: int
    step: int
    loss: torch.Tensor
    center_loss: torch.Tensor | None
    active: torch.Tensor
    distance: torch.Tensor | None
    _runner: ChainRunner = field(repr=False)

    def per_sample_losses(self, batch: Batch) -> torch.Tensor:
        """``[chains, B]`` per-sample (or ``[chains, B, T]`` per-position) losses of ``batch`` at every
        chain's current ``w_t`` (no grad). Positions a loss function masks out hold whatever it returned
        there: mask them with ``ChainRunner.center_output``'s mask (the mask depends on the batch only)."""
        return self._runner.per_sample_losses(batch)

    def evaluate(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """``[chains, ...]``: ``fn(module)`` evaluated with each chain's current parameters (no grad)."""
        return self._runner.evaluate(fn)


@dataclass
class ChainRunSummary:
    """The outcome of a run of chains.

    Attributes:
        chain_ids: global indices of the chains this process ran.
        mode: ``"vmap"`` or ``"sequential"``, the path actually used.
        diverged: ``[chains]`` True for chains dropped as diverged.
        diverged_at: ``[chains]`` step at which each chain diverged (−1 if it did not).
        reference_loss: ``L(w*)`` used by the divergence check (mean over the validation batch).
        diagnostics: root-mean-square over chains of devinterp's per-step norms (sampled at a few draws):
            ``grad_norm`` (``(ε/2)·nβ·‖∇L_B‖``), ``localization_norm``, ``noise_norm``.
    """

    chain_ids: list[int]
    mode: str
    diverged: torch.Tensor
    diverged_at: torch.Tensor
    reference_loss: float
    diagnostics: dict[str, float]


class EmptyMinibatchError(ValueError):
    """An SGLD minibatch in which the loss function's mask marks no valid position."""


class LossCheck(NamedTuple):
    """What ``check_loss_fn`` measured at the checkpoint: the mean minibatch loss and the FLOPs of that
    forward (matmul, convolution, attention; ``torch.utils.flop_counter``)."""

    loss: float
    flops: int


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
    (``check_loss_output``: ``[batch_size]`` or ``[batch_size, T]``, optionally with a position mask),
    and that its mean over the valid entries is finite. Returns that mean loss and, with
    ``count_flops``, the forward's FLOPs (else 0)."""
    stream = ChainBatches(source, config.batch_size, [0], config.seed, -1)
    device = next(model.parameters()).device
    batch = batch_to(chain_slice(stream.next_stacked(), 0), device)
    center = {PREFIX + name: p.detach() for name, p in model.named_parameters()}
    counter = FlopCounterMode(display=False) if count_flops else None
    with evaluation_mode(model), (forward_context or nullcontext)(), counter or nullcontext():
        losses = functional_call(LossModule(model, loss_fn), center, (batch,))
    values, mask = check_loss_output(losses, config.batch_size)
    loss = float(masked_mean(values.float(), mask))
    if not math.isfinite(loss):
        raise ValueError(f"loss_fn returned a non-finite loss ({loss}) at the checkpoint itself")
    return LossCheck(loss, counter.get_total_flops() if counter is not None else 0)


class ChainRunner:
    """Runs ``config.num_chains`` (or the given subset ``chain_ids``) localized SGLD chains.

    Args:
        model: the module at the checkpoint ``w*`` (read only; never modified).
        loss_fn: ``loss_fn(module, batch)``: per-sample losses ``Tensor[B]``, per-position losses
            ``Tensor[B, T]``, or ``(losses [B, T], mask [B, T])`` (``sgld.functional.LossFn``). A step's
            minibatch loss is the mean over the minibatch's samples (its valid positions).
        source: the data chains draw minibatches from.
        config: sampler settings.
        param_masks: which parameters (and entries) move; see ``resolve_param_masks``.
        chain_ids: global chain indices run by this process (default: all). Minibatch streams are seeded
            by ``(seed, run, chain)``; the vmap path's noise by ``(seed, run, chain_ids)``.
        run: index of this estimation run (e.g. the how-many-th call of a callback), mixed into seeds.
        forward_context: a factory of a context manager around every forward (e.g. autocast).
        progress: show a progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        source: SampleSource,
        config: SGLDConfig,
        param_masks: ParamMasks,
        *,
        chain_ids: Sequence[int] | None = None,
        run: int = 0,
        forward_context: ForwardContext | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.chain_ids = list(range(config.num_chains)) if chain_ids is None else list(chain_ids)
        self.run_index = run
        self.progress = progress
        self._forward_context = forward_context or nullcontext
        self._wrapper = LossModule(model, loss_fn)
        named = dict(model.named_parameters())
        self._device = next(iter(named.values())).device
        self._center = {PREFIX + name: p.detach() for name, p in named.items()}
        self._sampled_names = [PREFIX + name for name in param_masks]
        self._frozen = {k: v for k, v in self._center.items() if k not in set(self._sampled_names)}
        self._masks = {PREFIX + name: m for name, m in param_masks.items() if m is not None}
        self._batches = ChainBatches(
            source, config.batch_size, self.chain_ids, config.seed, run, shared=config.shared_batches
        )
        self.mode = "sequential" if config.chain_mode == "sequential" else "vmap"
        self._params: list[dict[str, torch.Tensor]] = []
        self._optimizers: list[SGMCMC] = []
        self._generators: list[torch.Generator] = []

    # ------------------------------------------------------------------ setup

    @property
    def num_chains(self) -> int:
        return len(self.chain_ids)

    @property
    def device(self) -> torch.device:
        return self._device

    def _build(self, mode: str) -> None:
        """Fresh parameter copies at ``w*``, optimizers and noise generators for ``mode``."""
        self.mode = mode
        chains = self.num_chains
        seed, run = self.config.seed, self.run_index
        if mode == "vmap":
            stacked = {
                n: self._center[n]
                .unsqueeze(0)
                .repeat(chains, *[1] * self._center[n].ndim)
                .requires_grad_(True)
                for n in self._sampled_names
            }
            masks = {n: m.unsqueeze(0).expand(chains, *m.shape).contiguous() for n, m in self._masks.items()}
            self._params = [stacked]
            self._optimizers = [self._make_optimizer(stacked, masks)]
            self._generators = [private_generator(seed, run, "noise", *self.chain_ids, device=self._device)]
        else:
            self._params = [
                {n: self._center[n].clone().requires_grad_(True) for n in self._sampled_names}
                for _ in self.chain_ids
            ]
            self._optimizers = [self._make_optimizer(p, self._masks) for p in self._params]
            self._generators = [
                private_generator(seed, run, "noise", c, device=self._device) for c in self.chain_ids
            ]

    def _make_optimizer(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> SGMCMC:
        cfg = self.config
        groups: list[dict[str, Any]] = [{"params": [params[n]], "mask": masks[n]} for n in masks]
        unmasked = [params[n] for n in self._sampled_names if n not in masks]
        if unmasked:
            groups.append({"params": unmasked})
        common: dict[str, Any] = dict(
            lr=cfg.lr,
            nbeta=cfg.resolved_nbeta,
            localization=cfg.localization,
            weight_decay=cfg.weight_decay,
            save_metrics=True,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="nbeta set to 1")
            if cfg.method == "rmsprop_sgld":
                optimizer = SGMCMC.rmsprop_sgld(
                    groups, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps, **common
                )
            else:
                optimizer = SGMCMC.sgld(groups, **common)
        optimizer.save_metrics = False  # switched on only at the few draws where diagnostics are sampled
        return optimizer

    # ------------------------------------------------------------------ forwards

    def _call(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return functional_call(self._wrapper, {**self._frozen, **params}, (batch,))

    def _chain_params(self, chain: int) -> dict[str, torch.Tensor]:
        if self.mode == "vmap":
            return {n: p[chain] for n, p in self._params[0].items()}
        return self._params[chain]

    def _step_losses(self, stacked_batch: Batch) -> torch.Tensor:
        """``[chains]`` minibatch mean loss of each chain on its own minibatch, with autograd (the mean
        over the valid positions for per-position losses)."""
        with self._forward_context():
            if self.mode == "vmap":
                output = vmap(self._call, in_dims=(0, 0))(self._params[0], stacked_batch)
            else:
                output = _stack_outputs(
                    [
                        self._call(self._params[c], chain_slice(stacked_batch, c))
                        for c in range(self.num_chains)
                    ]
                )
        return _chain_means(output)

    @torch.no_grad()
    def _center_losses(self, stacked_batch: Batch) -> torch.Tensor:
        """``[chains]`` minibatch mean loss at ``w*`` on each chain's minibatch (one forward, broadcast,
        when the chains share their minibatches)."""
        with self._forward_context():
            if self.config.shared_batches:
                losses, mask = split_loss_output(self._call({}, chain_slice(stacked_batch, 0)))
                return masked_mean(losses.float(), mask).expand(self.num_chains)
            if self.mode == "vmap":
                output = vmap(lambda b: self._call({}, b))(stacked_batch)
            else:
                output = _stack_outputs(
                    [self._call({}, chain_slice(stacked_batch, c)) for c in range(self.num_chains)]
                )
        return _chain_means(output)

    @torch.no_grad()
    def center_call(self, batch: Batch) -> Any:
        """What ``loss_fn`` returns on one ``batch`` at the checkpoint ``w*`` (unchecked)."""
        with evaluation_mode(self.model), self._forward_context():
            return self._call({}, batch_to(batch, self._device))

    @torch.no_grad()
    def center_output(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(losses, mask)`` of one ``batch`` at the checkpoint ``w*``: losses ``[B]`` or ``[B, T]``,
        mask ``[B, T]`` or ``None`` (every entry a sample)."""
        return split_loss_output(self.center_call(batch))

    @torch.no_grad()
    def center_losses(self, batch: Batch) -> torch.Tensor:
        """``[B]`` per-sample (or ``[B, T]`` per-position) losses of one ``batch`` at the checkpoint."""
        return self.center_output(batch)[0]

    @torch.no_grad()
    def per_sample_losses(self, batch: Batch) -> torch.Tensor:
        """``[chains, B]`` per-sample (or ``[chains, B, T]`` per-position) losses of one shared ``batch``
        at each chain's current parameters."""
        batch = batch_to(batch, self._device)
        with evaluation_mode(self.model), self._forward_context():
            if self.mode == "vmap":
                output = vmap(self._call, in_dims=(0, None))(self._params[0], batch)
            else:
                output = _stack_outputs([self._call(p, batch) for p in self._params])
        return split_loss_output(output)[0]

    @torch.no_grad()
    def evaluate(self, fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        """``[chains, ...]``: ``fn(module)`` at each chain's current parameters (a loop over chains)."""
        wrapper = LossModule(self.model, fn)
        with evaluation_mode(self.model), self._forward_context():
            return torch.stack(
                [
                    functional_call(wrapper, {**self._frozen, **self._chain_params(c)}, ())
                    for c in range(self.num_chains)
                ]
            )

    def _distance(self) -> torch.Tensor:
        """``[chains]`` ``‖w_t − w*‖`` over the sampled parameters."""
        with torch.no_grad():
            total = torch.zeros(self.num_chains, device=self._device)
            if self.mode == "vmap":
                # One elementwise pass over the stacked tensor, then one full reduction per chain's
                # contiguous slice: the same sums, in the same order, as the per-chain loop below
                # (bitwise), without rebuilding every chain's parameter dict for every name.
                for n, stacked in self._params[0].items():
                    squares = (stacked - self._center[n]).float().square()
                    total += torch.stack([squares[c].sum() for c in range(self.num_chains)])
                return total.sqrt()
            for n in self._sampled_names:
                for c in range(self.num_chains):
                    total[c] += (self._chain_params(c)[n] - self._center[n]).float().square().sum()
            return total.sqrt()

    # ------------------------------------------------------------------ run

    def run(self, on_draw: Callable[[DrawRecord], None] | None = None) -> ChainRunSummary:
        """Run all chains to the end, calling ``on_draw`` at every draw; return the summary."""
        with evaluation_mode(self.model):
            cfg = self.config
            # "auto"'s size rule (CPU only): compute-bound chain forwards run sequentially.
            on_cpu_auto = cfg.chain_mode == "auto" and self._device.type == "cpu"
            threshold = cfg.auto_sequential_flops if on_cpu_auto else None
            check = check_loss_fn(
                self.model,
                self._wrapper._fn,
                self._batches.source,
                cfg,
                self._forward_context,
                count_flops=threshold is not None,
            )
            if self.num_chains == 0:  # e.g. a DDP rank beyond the number of chains
                empty = torch.zeros(0, dtype=torch.bool)
                return ChainRunSummary([], self.mode, empty, empty.long(), check.loss, {})
            if cfg.chain_mode != "auto":
                self._build(self.mode)
            elif threshold is not None and check.flops >= threshold:
                self._build("sequential")
            else:
                self._build("vmap")
                if not self._vmap_works():
                    self._build("sequential")
            return self._run(on_draw, check.loss)

    def _vmap_works(self) -> bool:
        """Try one vmapped forward/backward on a 2-sample minibatch (a stream of its own, so the chains'
        minibatches are untouched); on failure warn once and report False."""
        probe = ChainBatches(
            self._batches.source, min(2, self.config.batch_size), self.chain_ids, self.config.seed, -2
        )
        try:
            self._step_losses(batch_to(probe.next_stacked(), self._device)).sum().backward()
        except EmptyMinibatchError:
            raise
        except Exception as error:
            warnings.warn(
                "SGLD chains fall back to the sequential path: the module could not be vmapped "
                f"({error!r:.300}). "
                "Set SGLDConfig(chain_mode='sequential') to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        finally:
            for p in self._params[0].values():
                p.grad = None
        return True

    def _run(self, on_draw: Callable[[DrawRecord], None] | None, reference_loss: float) -> ChainRunSummary:
        cfg = self.config
        chains = self.num_chains
        threshold = cfg.divergence_factor * max(reference_loss, cfg.divergence_floor)
        diverged = torch.zeros(chains, dtype=torch.bool)
        diverged_at = torch.full((chains,), -1, dtype=torch.long)
        metric_sums = dict.fromkeys(_METRIC_FIELDS, 0.0)
        metric_count = 0
        metric_every = max(1, cfg.num_draws // _METRIC_SAMPLES)
        for step in self._progress(range(cfg.num_steps)):
            draw, offset = divmod(step - cfg.num_burnin_steps, cfg.steps_between_draws)
            is_draw = step >= cfg.num_burnin_steps and offset == 0
            batch = batch_to(self._batches.next_stacked(), self._device)
            loss = self._step_losses(batch)
            loss.sum().backward()
            loss = loss.detach()
            bad = (~torch.isfinite(loss) | (loss > threshold)).cpu() & ~diverged
            if bool(bad.any()):
                diverged |= bad
                diverged_at[bad] = step
            sample_metrics = is_draw and draw % metric_every == 0
            if is_draw and on_draw is not None:
                center = self._center_losses(batch) if cfg.paired else None
                distance = self._distance() if sample_metrics else None
                on_draw(DrawRecord(draw, step, loss, center, ~diverged, distance, self))
            metrics = self._optimizer_step(sample_metrics)
            if metrics is not None:
                for name, value in metrics.items():
                    metric_sums[name] += value
                metric_count += 1
            if bool(diverged.any()):
                self._reset_to_center(diverged)
        diagnostics = {
            f"{'grad' if k == 'unscaled_grad' else k}_norm": v / max(metric_count, 1)
            for k, v in metric_sums.items()
        }
        return ChainRunSummary(self.chain_ids, self.mode, diverged, diverged_at, reference_loss, diagnostics)

    def _progress(self, steps: range) -> Iterator[int] | range:
        if not self.progress:
            return steps
        return tqdm(steps, desc=f"SGLD ({self.num_chains} chains, {self.mode})", leave=False)

    def _optimizer_step(self, sample_metrics: bool) -> dict[str, float] | None:
        """One SGMCMC step of every chain; with ``sample_metrics``, also return the RMS over chains of
        devinterp's per-chain update norms for this step."""
        squares = dict.fromkeys(_METRIC_FIELDS, 0.0)
        for optimizer, generator in zip(self._optimizers, self._generators, strict=True):
            optimizer.save_metrics = sample_metrics
            optimizer.step(noise_generator=generator)
            if sample_metrics:
                metrics = optimizer.get_metrics()
                for name in _METRIC_FIELDS:
                    squares[name] += float(getattr(metrics, name).sum()) ** 2
            optimizer.save_metrics = False
            optimizer.zero_grad(set_to_none=True)
        if not sample_metrics:
            return None
        return {name: math.sqrt(total / self.num_chains) for name, total in squares.items()}

    @torch.no_grad()
    def _reset_to_center(self, diverged: torch.Tensor) -> None:
        """Park diverged chains at ``w*`` so they cannot overflow; their records are ignored."""
        for c in torch.nonzero(diverged).flatten().tolist():
            for n, p in self._chain_params(c).items():
                p.copy_(self._center[n])


def _stack_outputs(outputs: list[Any]) -> Any:
    """Stack per-chain loss outputs (tensors, or ``(losses, mask)`` pairs) along a leading chain dim."""
    pairs = [split_loss_output(o) for o in outputs]
    losses = torch.stack([p[0] for p in pairs])
    if pairs[0][1] is None:
        return losses
    return losses, torch.stack([p[1] for p in pairs])


def _chain_means(output: Any) -> torch.Tensor:
    """``[chains]`` mean loss over each chain's valid samples of a stacked loss output.

    Raises:
        ValueError: a chain's minibatch has no valid position (its mean would be 0/0).
    """
    losses, mask = split_loss_output(output)
    if mask is not None and bool((mask.flatten(1).sum(dim=1) == 0).any()):
        raise EmptyMinibatchError(
            "loss_fn's mask marks no valid position in an SGLD minibatch; every minibatch needs at least "
            "one True position (raise SGLDConfig.batch_size, or drop samples without valid positions)"
        )
    return masked_mean(losses.float(), mask, start_dim=1)
