"""The chain engine: localized SGLD chains from a snapshot of the current parameters.

All chains start at ``w*`` and take devinterp's ``SGMCMC.sgld`` / ``SGMCMC.rmsprop_sgld`` step
(docs/concepts/llc.md). Each chain owns its parameters (one flat vector per chain, ``sgld.flat``), its
SGMCMC optimizer and its noise generator, seeded by ``(seed, run, chain)``; its minibatches come from a
stream seeded the same way. A chain's random numbers therefore depend only on ``(seed, run, chain)``: not
on the other chains, on the chain mode or on how many processes share the chains (DDP).

The two modes differ only in where the vectors live and in the forward/backward. ``"vmap"`` keeps the
chains' vectors as the rows of one ``[chains, D]`` tensor and serves every chain with one
``torch.func.functional_call`` + ``vmap`` forward/backward; each chain's optimizer updates its own row (a
view) with its own row of the gradient. ``"sequential"`` keeps a separate vector per chain and runs one
forward per chain, for modules that cannot be vmapped. Both give the same chains to float rounding.

Divergence (``sgld.divergence``): a chain whose minibatch loss or gradient is non-finite, or whose loss
exceeds ``divergence_factor × max(L(w*), divergence_floor)``, is parked at ``w*`` before its next update,
never stepped again and reported; the SGMCMC step never sees a non-finite gradient.

Isolation (docs/concepts/isolation.md): the live module's parameters are only read (detached); the
chains own their copies; forwards run in eval mode (restored afterwards) so BatchNorm statistics never
change; all randomness comes from private generators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from devinterp.optim import SGMCMC
from torch import nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from lightning_patterning.sgld.batches import (
    Batch,
    ChainBatches,
    SampleSource,
    batch_to,
    capped_batch_size,
    chain_slice,
)
from lightning_patterning.sgld.check import ForwardContext, LossCheck, check_loss_fn
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import NonFiniteEvent, non_finite_events
from lightning_patterning.sgld.flat import FlatLayout
from lightning_patterning.sgld.functional import (
    PREFIX,
    LossFn,
    LossModule,
    evaluation_mode,
    masked_mean,
    split_loss_output,
)
from lightning_patterning.sgld.restrict import ParamMasks
from lightning_patterning.sgld.seeding import private_generator

__all__ = [
    "ChainRunSummary",
    "ChainRunner",
    "DrawRecord",
    "ForwardContext",
    "LossCheck",
    "Progress",
    "ProgressFn",
    "check_loss_fn",
]

ProgressFn = Callable[[range, str], Iterable[int]]
"""``fn(steps, details) -> steps``: wraps the SGLD steps in a progress display (``details`` says e.g.
``"(4 chains, vmap)"``)."""
Progress = bool | str | ProgressFn

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
        non_finite: the chains dropped because of a non-finite loss or gradient, with the step and samples.
    """

    chain_ids: list[int]
    mode: str
    diverged: torch.Tensor
    diverged_at: torch.Tensor
    reference_loss: float
    diagnostics: dict[str, float]
    non_finite: list[NonFiniteEvent] = field(default_factory=list)


class EmptyMinibatchError(ValueError):
    """An SGLD minibatch in which the loss function's mask marks no valid position."""


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
        chain_ids: global chain indices run by this process (default: all). Chain ``c``'s minibatches and
            noise are seeded by ``(seed, run, c)``, so its draws do not depend on the other chains.
        run: index of this estimation run (e.g. the how-many-th call of a callback), mixed into seeds.
        forward_context: a factory of a context manager around every forward (e.g. autocast).
        progress: ``True`` shows a tqdm bar, a string shows it with that label (e.g. the callback and
            step), a ``ProgressFn`` wraps the steps in a display of the caller's (e.g. the Trainer's).
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
        progress: Progress = False,
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
        sampled = [PREFIX + name for name in param_masks]
        self._frozen = {k: v for k, v in self._center.items() if k not in set(sampled)}
        self._layout = FlatLayout({n: self._center[n] for n in sampled})
        self._center_vectors = self._layout.flatten(self._center)
        self._vector_masks = self._flat_masks(
            {PREFIX + name: m for name, m in param_masks.items() if m is not None}
        )
        self.batch_size = capped_batch_size(config.batch_size, source)
        self._batches = ChainBatches(
            source, self.batch_size, self.chain_ids, config.seed, run, shared=config.shared_batches
        )
        self.mode = "sequential" if config.chain_mode == "sequential" else "vmap"
        self._vectors: list[list[torch.Tensor]] = []  # per chain: its flat parameter vectors
        self._stack: list[torch.Tensor] = []  # vmap: per vector, [chains, D] whose rows are _vectors
        self._optimizers: list[SGMCMC] = []
        self._generators: list[torch.Generator] = []

    # ------------------------------------------------------------------ setup

    @property
    def num_chains(self) -> int:
        return len(self.chain_ids)

    @property
    def device(self) -> torch.device:
        return self._device

    def _flat_masks(self, masks: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        """Per flat vector, the per-entry mask (1 where the restriction samples), or ``None`` if the vector
        is sampled whole."""
        if not masks:
            return [None] * len(self._layout.keys)
        full = {n: masks.get(n, torch.ones_like(self._center[n])) for n in self._layout.names}
        vectors = self._layout.flatten(full)
        masked = {self._layout.group_of(n) for n in masks}
        return [v if g in masked else None for g, v in enumerate(vectors)]

    def _build(self, mode: str) -> None:
        """Fresh parameter vectors at ``w*``, optimizers and noise generators, one of each per chain. In
        vmap mode the vectors are the rows of one stacked leaf per vector (views of it); in sequential mode
        they are leaves of their own."""
        self.mode = mode
        seed, run = self.config.seed, self.run_index
        chains = self.num_chains
        if mode == "vmap":
            self._stack = [
                v.unsqueeze(0).repeat(chains, 1).requires_grad_(True) for v in self._center_vectors
            ]
            self._vectors = [[s.detach()[c] for s in self._stack] for c in range(chains)]
        else:
            self._stack = []
            self._vectors = [
                [v.clone().requires_grad_(True) for v in self._center_vectors] for _ in range(chains)
            ]
        self._optimizers = [self._make_optimizer(vectors) for vectors in self._vectors]
        self._generators = [
            private_generator(seed, run, "noise", c, device=self._device) for c in self.chain_ids
        ]

    def _make_optimizer(self, vectors: list[torch.Tensor]) -> SGMCMC:
        cfg = self.config
        groups: list[dict[str, Any]] = [
            {"params": [v]} if m is None else {"params": [v], "mask": m}
            for v, m in zip(vectors, self._vector_masks, strict=True)
        ]
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
        """Chain ``chain``'s parameters as views of its vectors (differentiable)."""
        return self._layout.unflatten(self._vectors[chain])

    def _stacked_params(self) -> dict[str, torch.Tensor]:
        """vmap mode: every chain's parameters, ``name → [chains, *shape]`` views of the stacked leaves."""
        return self._layout.unflatten(self._stack)

    def _collect_gradients(self) -> None:
        """vmap mode: hand each chain's row of the stacked gradient to its vectors (views, no copy)."""
        for g, stacked in enumerate(self._stack):
            if stacked.grad is not None:
                for vectors, row in zip(self._vectors, stacked.grad.unbind(0), strict=True):
                    vectors[g].grad = row

    def _step_outputs(self, stacked_batch: Batch) -> Any:
        """Each chain's loss output on its own minibatch, stacked along a leading chain dimension (losses
        ``[chains, B]`` or ``[chains, B, T]``, or ``(losses, mask)``), with autograd."""
        with self._forward_context():
            if self.mode == "vmap":
                return vmap(self._call, in_dims=(0, 0))(self._stacked_params(), stacked_batch)
            return _stack_outputs(
                [
                    self._call(self._chain_params(c), chain_slice(stacked_batch, c))
                    for c in range(self.num_chains)
                ]
            )

    @torch.no_grad()
    def _center_outputs(self, stacked_batch: Batch) -> Any:
        """The loss output at ``w*`` on each chain's minibatch, stacked like ``_step_outputs`` (one forward,
        broadcast, when the chains share their minibatches)."""
        with self._forward_context():
            if self.config.shared_batches:
                return _expand_output(self._call({}, chain_slice(stacked_batch, 0)), self.num_chains)
            if self.mode == "vmap":
                return vmap(lambda b: self._call({}, b))(stacked_batch)
            return _stack_outputs(
                [self._call({}, chain_slice(stacked_batch, c)) for c in range(self.num_chains)]
            )

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
                output = vmap(self._call, in_dims=(0, None))(self._stacked_params(), batch)
            else:
                output = _stack_outputs(
                    [self._call(self._chain_params(c), batch) for c in range(self.num_chains)]
                )
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

    @torch.no_grad()
    def _distance(self) -> torch.Tensor:
        """``[chains]`` ``‖w_t − w*‖`` over the sampled parameters."""
        return torch.stack(
            [
                sum(
                    (v - center).float().square().sum()
                    for v, center in zip(vectors, self._center_vectors, strict=True)
                )
                for vectors in self._vectors
            ]
        ).sqrt()

    @torch.no_grad()
    def _finite_gradients(self) -> torch.Tensor:
        """``[chains]`` (CPU) True where every entry of the chain's gradient is finite (or it has none)."""
        true = torch.ones(self.num_chains, dtype=torch.bool, device=self._device)
        if self.mode == "vmap":
            flags = [torch.isfinite(s.grad).all(dim=1) if s.grad is not None else true for s in self._stack]
        else:
            flags = [
                torch.stack([torch.isfinite(v.grad).all() if v.grad is not None else true[0] for v in group])
                for group in zip(*self._vectors, strict=True)
            ]
        return torch.stack(flags).all(dim=0).cpu()

    # ------------------------------------------------------------------ run

    def run(self, on_draw: Callable[[DrawRecord], None] | None = None) -> ChainRunSummary:
        """Run all chains to the end, calling ``on_draw`` at every draw; return the summary.

        Raises:
            NonFiniteCheckpointError: the loss at ``w*`` is non-finite on the validation minibatch.
        """
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
            self._batches.source, min(2, self.batch_size), self.chain_ids, self.config.seed, -2
        )
        try:
            _chain_means(self._step_outputs(batch_to(probe.next_stacked(), self._device))).sum().backward()
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
            for s in self._stack:
                s.grad = None
        return True

    def _run(self, on_draw: Callable[[DrawRecord], None] | None, reference_loss: float) -> ChainRunSummary:
        cfg = self.config
        chains = self.num_chains
        threshold = cfg.divergence_factor * max(reference_loss, cfg.divergence_floor)
        diverged = torch.zeros(chains, dtype=torch.bool)
        diverged_at = torch.full((chains,), -1, dtype=torch.long)
        events: list[NonFiniteEvent] = []
        metric_sums = dict.fromkeys(_METRIC_FIELDS, 0.0)
        metric_count = 0
        metric_every = max(1, cfg.num_draws // _METRIC_SAMPLES)
        for step in self._progress(range(cfg.num_steps)):
            draw, offset = divmod(step - cfg.num_burnin_steps, cfg.steps_between_draws)
            is_draw = step >= cfg.num_burnin_steps and offset == 0
            batch = batch_to(self._batches.next_stacked(), self._device)
            output = self._step_outputs(batch)
            loss = _chain_means(output)
            loss.sum().backward()
            loss, per_sample = loss.detach(), _valid_values(output).detach()
            paired_draw = is_draw and on_draw is not None and cfg.paired
            center_output = self._center_outputs(batch) if paired_draw else None
            center = _chain_means(center_output) if center_output is not None else None
            center_samples = _valid_values(center_output) if center_output is not None else None
            non_finite, over = self._screen(loss, center_samples, threshold)
            bad = ~diverged & (non_finite | over)
            if bool(bad.any()):
                events += self._events(step, draw if is_draw else None, loss, per_sample, center_samples, bad)
                diverged |= bad
                diverged_at[bad] = step
            sample_metrics = is_draw and draw % metric_every == 0
            if is_draw and on_draw is not None:
                distance = self._distance() if sample_metrics else None
                on_draw(DrawRecord(draw, step, loss, center, ~diverged, distance, self))
            metrics = self._optimizer_step(sample_metrics, ~diverged)
            if metrics is not None:
                for name, value in metrics.items():
                    metric_sums[name] += value
                metric_count += 1
            if bool(bad.any()):
                self._reset_to_center(bad)
        diagnostics = {
            f"{'grad' if k == 'unscaled_grad' else k}_norm": v / max(metric_count, 1)
            for k, v in metric_sums.items()
        }
        return ChainRunSummary(
            self.chain_ids, self.mode, diverged, diverged_at, reference_loss, diagnostics, events
        )

    @torch.no_grad()
    def _screen(
        self, loss: torch.Tensor, center_samples: torch.Tensor | None, threshold: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[chains]`` (CPU): whether the minibatch loss, the gradient or the paired loss at ``w*`` holds
        a non-finite value (one sum per chain: NaN and inf propagate through it), and whether the loss
        exceeds the divergence threshold."""
        total = loss + self._gradient_sums()
        if center_samples is not None:
            total = total + center_samples.float().flatten(1).sum(dim=1)
        flags = torch.stack([~torch.isfinite(total), loss > threshold]).cpu()
        return flags[0], flags[1]

    def _gradient_sums(self) -> torch.Tensor:
        """``[chains]`` the sum of every entry of each chain's gradient (0 where there is none)."""
        total = torch.zeros(self.num_chains, device=self._device)
        if self.mode == "vmap":
            for s in self._stack:
                if s.grad is not None:
                    total = total + s.grad.float().sum(dim=1)
            return total
        sums = [
            sum((v.grad.float().sum() for v in vs if v.grad is not None), total[0]) for vs in self._vectors
        ]
        return torch.stack(sums)

    def _events(
        self,
        step: int,
        draw: int | None,
        loss: torch.Tensor,
        per_sample: torch.Tensor,
        center_samples: torch.Tensor | None,
        chains: torch.Tensor,
    ) -> list[NonFiniteEvent]:
        """What was non-finite for each of the flagged ``chains`` (see ``non_finite_events``)."""
        indices = self._batches.last_indices
        assert indices is not None
        rows = indices.expand(self.num_chains, -1) if self.config.shared_batches else indices
        return non_finite_events(
            self.chain_ids,
            rows,
            step,
            draw,
            loss,
            per_sample,
            self._finite_gradients(),
            center_samples,
            chains,
        )

    def _progress(self, steps: range) -> Iterable[int]:
        details = f"({self.num_chains} chains, {self.mode})"
        if callable(self.progress):
            return self.progress(steps, details)
        if not self.progress:
            return steps
        label = self.progress if isinstance(self.progress, str) else "SGLD"
        return tqdm(steps, desc=f"{label} {details}", leave=False)

    def _optimizer_step(
        self, sample_metrics: bool, active: torch.Tensor | None = None
    ) -> dict[str, float] | None:
        """One SGMCMC step of every ``active`` chain (default all), then clear every chain's gradient;
        with ``sample_metrics``, also return the RMS over the stepped chains of devinterp's update norms."""
        self._collect_gradients()
        squares = dict.fromkeys(_METRIC_FIELDS, 0.0)
        stepped = 0
        steps = [True] * self.num_chains if active is None else active.tolist()
        for step, optimizer, generator in zip(steps, self._optimizers, self._generators, strict=True):
            if step:
                optimizer.save_metrics = sample_metrics
                optimizer.step(noise_generator=generator)
                if sample_metrics:
                    metrics = optimizer.get_metrics()
                    for name in _METRIC_FIELDS:
                        squares[name] += float(getattr(metrics, name).sum()) ** 2
                    stepped += 1
                optimizer.save_metrics = False
        for vectors in self._vectors:  # what optimizer.zero_grad(set_to_none=True) does, without its overhead
            for v in vectors:
                v.grad = None
        for s in self._stack:
            s.grad = None
        if not sample_metrics or stepped == 0:
            return None
        return {name: math.sqrt(total / stepped) for name, total in squares.items()}

    @torch.no_grad()
    def _reset_to_center(self, chains: torch.Tensor) -> None:
        """Park the given chains at ``w*`` so they cannot overflow; their records are ignored."""
        for c in torch.nonzero(chains).flatten().tolist():
            for v, center in zip(self._vectors[c], self._center_vectors, strict=True):
                v.copy_(center)


def _stack_outputs(outputs: list[Any]) -> Any:
    """Stack per-chain loss outputs (tensors, or ``(losses, mask)`` pairs) along a leading chain dim."""
    pairs = [split_loss_output(o) for o in outputs]
    losses = torch.stack([p[0] for p in pairs])
    if pairs[0][1] is None:
        return losses
    return losses, torch.stack([p[1] for p in pairs])


def _expand_output(output: Any, chains: int) -> Any:
    """One loss output broadcast (without a copy) to ``chains`` identical chains."""
    losses, mask = split_loss_output(output)
    losses = losses.unsqueeze(0).expand(chains, *losses.shape)
    return losses if mask is None else (losses, mask.unsqueeze(0).expand(chains, *mask.shape))


def _valid_values(output: Any) -> torch.Tensor:
    """The losses of a stacked loss output with masked-out positions set to 0 (so that only samples can
    make a chain's values non-finite)."""
    losses, mask = split_loss_output(output)
    return losses if mask is None else torch.where(mask, losses, losses.new_zeros(()))


def _chain_means(output: Any) -> torch.Tensor:
    """``[chains]`` mean loss over each chain's valid samples of a stacked loss output.

    Raises:
        EmptyMinibatchError: a chain's minibatch has no valid position (its mean would be 0/0).
    """
    losses, mask = split_loss_output(output)
    if mask is not None and bool((mask.flatten(1).sum(dim=1) == 0).any()):
        raise EmptyMinibatchError(
            "loss_fn's mask marks no valid position in an SGLD minibatch; every minibatch needs at least "
            "one True position (raise SGLDConfig.batch_size, or drop samples without valid positions)"
        )
    return masked_mean(losses.float(), mask, start_dim=1)
