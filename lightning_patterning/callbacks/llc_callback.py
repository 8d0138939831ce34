"""``LLCCallback``: estimate the local learning coefficient at the current checkpoint during training."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.schedule import Schedule
from lightning_patterning.callbacks.trainer_adapters import (
    StrategySum,
    check_strategy,
    estimation_module,
    forward_context,
    local_chain_ids,
    resolve_loss_fn,
    sgld_dataloader,
)
from lightning_patterning.estimators.llc import LLCResult, estimate_llc
from lightning_patterning.sgld.batches import SampleSource
from lightning_patterning.sgld.chains import check_loss_fn
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.functional import LossFn
from lightning_patterning.sgld.restrict import resolve_param_masks


class LLCCallback(Callback):
    """Runs localized SGLD at the current weights on a schedule and logs the LLC estimate.

    Logged (to every logger, at ``trainer.global_step``): ``{name}/mean``, ``{name}/std``,
    ``{name}/stderr``, ``{name}/init_loss`` and the diagnostics ``sgld/{name}/diverged_chains``,
    ``sgld/{name}/distance``, ``sgld/{name}/grad_norm``, ``sgld/{name}/noise_norm``,
    ``sgld/{name}/localization_norm``, ``sgld/{name}/seconds``; the chain traces as a TensorBoard figure
    ``{name}/traces``. The same scalars go to ``trainer.callback_metrics`` (for checkpoint monitors).

    Estimation never changes training (DESIGN.md): it works on a snapshot of the parameters, restores
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
        progress: show a progress bar during each SGLD run (rank 0).
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
        if config is None:
            config = SGLDConfig()
        if not isinstance(config, SGLDConfig):
            raise TypeError(f"config must be an lp.SGLDConfig, got {type(config).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(module, batch) -> Tensor[B], got {loss_fn!r}"
            )
        if dataloader is not None and not isinstance(dataloader, DataLoader):
            raise TypeError(f"dataloader must be a torch DataLoader or None, got {type(dataloader).__name__}")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
        self.schedule = Schedule(every_n_train_steps, every_n_epochs, log_spaced_steps, first_step, last_step)
        if self.schedule.is_empty:
            raise ValueError(
                "LLCCallback needs a schedule: set every_n_train_steps, every_n_epochs or log_spaced_steps"
            )
        self.config = config
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.restrict = restrict
        self.name = name
        self.log_traces = log_traces
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self.latest: LLCResult | None = None
        self._runs = 0
        self._last_step = -1
        self._loss_fn: LossFn | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def should_run(self, step: int, epoch: int) -> bool:
        """Whether to estimate after optimizer step ``step`` (override for a custom schedule)."""
        return self.schedule.at_step(step)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, "LLCCallback")
        module = estimation_module(trainer) if trainer.lightning_module is not None else pl_module
        self._loss_fn = resolve_loss_fn(pl_module, self.loss_fn, "LLCCallback")
        try:
            resolve_param_masks(module, self.restrict)
        except ValueError as error:
            raise MisconfigurationException(f"LLCCallback: {error}") from error

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._loss_fn is not None, "setup() was not called"
        check_loss_fn(
            estimation_module(trainer),
            self._loss_fn,
            SampleSource(sgld_dataloader(trainer, self.dataloader, "LLCCallback")),
            self.config,
            forward_context(trainer),
        )
        if self.schedule.log_spaced_steps is not None:
            self.schedule.resolve(trainer.max_steps if trainer.max_steps > 0 else _estimated_steps(trainer))
        tensorboard.add_layout(
            trainer,
            "lightning_patterning",
            {
                f"{self.name}": [f"^{self.name}/(mean|std|stderr)$"],
                f"sgld ({self.name})": [f"^sgld/{self.name}/"],
            },
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._skip(trainer) or step == self._last_step or not self.should_run(step, trainer.current_epoch):
            return
        self._estimate(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer) or trainer.global_step == self._last_step:
            return
        if self.schedule.at_epoch_end(trainer.current_epoch):
            self._estimate(trainer, pl_module, on_step=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": self._runs, "last_step": self._last_step, "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._runs = int(state_dict["runs"])
        self._last_step = int(state_dict["last_step"])
        self.history = [dict(h) for h in state_dict["history"]]

    # ------------------------------------------------------------------ work

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run or not trainer.training)

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        assert self._loss_fn is not None, "setup() was not called"
        step = trainer.global_step
        start = time.perf_counter()
        result = estimate_llc(
            estimation_module(trainer),
            self._loss_fn,
            sgld_dataloader(trainer, self.dataloader, "LLCCallback"),
            self.config,
            self.restrict,
            chain_ids=local_chain_ids(self.config.num_chains, trainer),
            run=self._runs,
            all_reduce=StrategySum(trainer),
            forward_context=forward_context(trainer),
            progress=self.progress and trainer.is_global_zero,
        )
        seconds = time.perf_counter() - start
        self._runs += 1
        self._last_step = step
        self.latest = result
        self.history.append(
            {"step": step, "epoch": trainer.current_epoch, "seconds": seconds, **result.scalars()}
        )
        self._log(trainer, pl_module, result, seconds, on_step)

    def _log(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        result: LLCResult,
        seconds: float,
        on_step: bool,
    ) -> None:
        n, step = self.name, trainer.global_step
        scalars = {f"{n}/{k}": result.scalars()[k] for k in ("mean", "std", "stderr", "init_loss")}
        diagnostics = {
            k: v for k, v in result.scalars().items() if k not in ("mean", "std", "stderr", "init_loss")
        }
        scalars.update({f"sgld/{n}/{k}": v for k, v in diagnostics.items()})
        scalars[f"sgld/{n}/seconds"] = seconds
        tensorboard.log_scalars(trainer, scalars, step)
        for key, value in scalars.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=False)
        if result.diverged_chains:
            rank_zero_warn(
                f"LLCCallback ({n}) at step {step}: {result.diverged_chains} of {result.num_chains} "
                "SGLD chains diverged and were dropped"
                + (" — no estimate this time" if math.isnan(result.mean) else "")
                + "; consider a smaller lr or a larger localization."
            )
        if self.log_traces:
            tensorboard.log_trace_figure(trainer, f"{n}/traces", result.trace, result.init_loss, step)


def _estimated_steps(trainer: pl.Trainer) -> int:
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:
        return -1
