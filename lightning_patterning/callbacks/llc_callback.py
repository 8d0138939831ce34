"""``LLCCallback``: estimate the local learning coefficient at the current checkpoint during training."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.base import EstimationCallback
from lightning_patterning.estimators.llc import LLCResult, estimate_llc
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.functional import LossFn
from lightning_patterning.sgld.restrict import resolve_param_masks


class LLCCallback(EstimationCallback):
    """Runs localized SGLD at the current weights on a schedule and logs the LLC estimate.

    Logged (to every logger, at ``trainer.global_step``; every tag starts with ``name``): the estimate
    ``{name}/mean``, ``{name}/std``, ``{name}/stderr``, ``{name}/init_loss`` and the diagnostics
    ``{name}/sgld/diverged_chains``, ``{name}/sgld/distance``, ``{name}/sgld/grad_norm``,
    ``{name}/sgld/noise_norm``, ``{name}/sgld/localization_norm``, ``{name}/sgld/seconds``; the chain traces
    as a TensorBoard figure ``{name}/traces``; a custom-scalars section ``{name}``. The same scalars go to
    ``trainer.callback_metrics`` (for checkpoint monitors). Non-finite values are not logged (e.g. when
    every chain diverged), and an estimate skipped because the loss at the checkpoint is non-finite logs
    nothing (see ``EstimationCallback``).

    Estimation never changes training (docs/concepts/isolation.md): it works on a snapshot of the
    parameters, restores
    train/eval flags, never touches gradients, buffers, optimizer state or the global RNG. Under DDP the
    chains are split over ranks (chain ``c`` on rank ``c mod world``) and every rank ends with the same
    estimate.

    Args:
        config: SGLD settings (default ``SGLDConfig()``).
        every_n_train_steps: run after every N-th optimizer step.
        every_n_epochs: run at the end of every N-th epoch.
        log_spaced_steps: run at this many log-spaced steps between ``first_step`` and ``last_step``
            (default: the Trainer's ``max_steps`` or estimated number of steps).
        first_step: first step of the log-spaced schedule.
        last_step: last step of the log-spaced schedule.
        loss_fn: ``loss_fn(module, batch) -> Tensor[B]``; default ``module.per_sample_loss(batch)``.
        dataloader: data for SGLD minibatches; default the Trainer's training DataLoader.
        restrict: glob patterns of parameter names for a weight-restricted LLC (default: all).
        name: prefix of the logged tags and key of the callback state (distinct names let several
            instances coexist, e.g. one per restricted component).
        log_traces: log the chain-trace figure to TensorBoard.
        progress: show a progress bar during each SGLD run, labelled ``{name} @ step {step}``: on rank 0,
            in the Trainer's own progress display (tqdm or Rich), and only when the Trainer shows one.
    """

    def __init__(
        self,
        config: SGLDConfig | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_steps: int | None = None,
        first_step: int = 1,
        last_step: int | None = None,
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        restrict: str | list[str] | None = None,
        name: str = "llc",
        log_traces: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__(
            config,
            every_n_train_steps,
            every_n_epochs,
            log_spaced_steps,
            first_step,
            last_step,
            loss_fn,
            dataloader,
            name,
            progress,
        )
        self.restrict = restrict
        self.log_traces = log_traces
        self.latest: LLCResult | None = None

    def check_module(self, module: nn.Module) -> None:
        try:
            resolve_param_masks(module, self.restrict)
        except ValueError as error:
            raise MisconfigurationException(f"LLCCallback: {error}") from error

    def estimate(
        self, trainer: pl.Trainer, module: nn.Module, common: dict[str, Any]
    ) -> tuple[LLCResult, dict]:
        result = estimate_llc(
            module, self._require_loss_fn(), self.sgld_data(trainer), self.config, self.restrict, **common
        )
        self.latest = result
        return result, result.scalars()

    def log_result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: LLCResult, on_step: bool
    ) -> None:
        n, step = self.name, trainer.global_step
        values = result.scalars()
        headline = ("mean", "std", "stderr", "init_loss")
        scalars = {f"{n}/{k}": values[k] for k in headline}
        scalars.update({f"{n}/sgld/{k}": v for k, v in values.items() if k not in headline})
        scalars[f"{n}/sgld/seconds"] = self.history[-1]["seconds"]
        self.log_scalars(trainer, pl_module, scalars, on_step)
        if result.diverged_chains:
            rank_zero_warn(
                f"LLCCallback ({n}) at step {step}: {result.diverged_chains} of {result.num_chains} "
                "SGLD chains diverged and were dropped"
                + (" — no estimate this time" if math.isnan(result.mean) else "")
                + "; consider a smaller lr or a larger localization (chains dropped for a non-finite loss "
                "or gradient are described by a NonFiniteLossWarning: check the data first)."
            )
        if self.log_traces and math.isfinite(result.init_loss):
            tensorboard.log_trace_figure(trainer, f"{n}/traces", result.trace, result.init_loss, step)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.name
        tensorboard.add_layout(
            trainer, n, {f"{n}: LLC": [f"^{n}/(mean|std|stderr)$"], f"{n}: SGLD": [f"^{n}/sgld/"]}
        )
