"""``EstimationCallback``: the schedule, isolation guards, state and Trainer plumbing shared by callbacks
that run SGLD at the current checkpoint."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.progress import sgld_progress
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
from lightning_patterning.sgld.batches import SampleSource
from lightning_patterning.sgld.check import check_loss_fn
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import NonFiniteCheckpointError, NonFiniteLossWarning
from lightning_patterning.sgld.functional import LossFn


class EstimationCallback(Callback):
    """Base class: decides when to estimate, hands the estimator what it needs, keeps a history.

    Subclasses implement ``estimate(trainer, module, common) -> (result, row)`` and
    ``log_result(trainer, pl_module, result, on_step)``. ``common`` holds the keyword arguments every
    estimator takes (``chain_ids``, ``run``, ``all_reduce``, ``forward_context``, ``progress``).

    An estimate never stops training: when the loss at the checkpoint is non-finite the estimator raises
    ``NonFiniteCheckpointError``, and the callback warns (saying whether the weights or the data are
    non-finite), records ``{"skipped": 1.0}`` in ``history``, logs nothing for that step and lets training
    go on (``on_skip`` is the hook for subclasses). Non-finite chains inside an estimate are dropped by the
    estimator itself.

    Args: see ``LLCCallback``.
    """

    def __init__(
        self,
        config: SGLDConfig | None,
        every_n_train_steps: int | None,
        every_n_epochs: int | None,
        log_spaced_steps: int | None,
        first_step: int,
        last_step: int | None,
        loss_fn: LossFn | None,
        dataloader: DataLoader | None,
        name: str,
        progress: bool,
    ) -> None:
        owner = type(self).__name__
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
                f"{owner} needs a schedule: set every_n_train_steps, every_n_epochs or log_spaced_steps"
            )
        self.config = config
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.name = name
        self.progress = progress
        self.history: list[dict[str, Any]] = []
        self._runs = 0
        self._last_step = -1
        self._loss_fn: LossFn | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def should_run(self, step: int, epoch: int) -> bool:
        """Whether to estimate after optimizer step ``step`` (override for a custom schedule)."""
        return self.schedule.at_step(step)

    # ------------------------------------------------------------------ subclass interface

    def check_module(self, module: nn.Module) -> None:
        """Validate module-dependent arguments at setup (raise ``MisconfigurationException``)."""

    def estimate(
        self, trainer: pl.Trainer, module: nn.Module, common: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        """Run the estimator; return the result and a flat history row of floats."""
        raise NotImplementedError

    def log_result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: Any, on_step: bool
    ) -> None:
        """Log the result (every rank calls this; loggers write on rank 0 only)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        check_strategy(trainer, owner)
        self._loss_fn = resolve_loss_fn(pl_module, self.loss_fn, owner)
        self.check_module(estimation_module(trainer) if trainer.lightning_module is not None else pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.log_spaced_steps is not None:
            self.schedule.resolve(trainer.max_steps if trainer.max_steps > 0 else _estimated_steps(trainer))
        try:
            check = check_loss_fn(
                estimation_module(trainer),
                self._require_loss_fn(),
                SampleSource(self.sgld_data(trainer)),
                self.config,
                forward_context(trainer),
            )
        except NonFiniteCheckpointError as error:
            rank_zero_warn(
                f"{type(self).__name__} ({self.name}) at the start of training: {error}. Estimates are "
                "skipped whenever the loss at the checkpoint is non-finite; training continues.",
                category=NonFiniteLossWarning,
            )
            return
        if check.non_finite:
            rank_zero_warn(
                f"{type(self).__name__} ({self.name}) at the start of training: samples "
                f"{list(check.non_finite)} of the SGLD data have a non-finite loss at finite weights (check "
                "them for NaN/inf); SGLD chains that draw them will be dropped.",
                category=NonFiniteLossWarning,
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._skip(trainer) or step == self._last_step or not self.should_run(step, trainer.current_epoch):
            return
        self._run(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._skip(trainer) or trainer.global_step == self._last_step:
            return
        if self.schedule.at_epoch_end(trainer.current_epoch):
            self._run(trainer, pl_module, on_step=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": self._runs, "last_step": self._last_step, "history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._runs = int(state_dict["runs"])
        self._last_step = int(state_dict["last_step"])
        self.history = [dict(h) for h in state_dict["history"]]

    # ------------------------------------------------------------------ plumbing

    def sgld_data(self, trainer: pl.Trainer) -> DataLoader:
        """The DataLoader SGLD draws minibatches from."""
        return sgld_dataloader(trainer, self.dataloader, type(self).__name__)

    def log_scalars(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, float], on_step: bool
    ) -> None:
        """Send the finite ``scalars`` to every logger at ``trainer.global_step`` and to
        ``trainer.callback_metrics`` (for checkpoint monitors); non-finite values (e.g. an estimate whose
        chains all diverged) are left out rather than logged as NaN."""
        finite = {k: float(v) for k, v in scalars.items() if math.isfinite(v)}
        tensorboard.log_scalars(trainer, finite, trainer.global_step)
        for key, value in finite.items():
            pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=False)

    def _require_loss_fn(self) -> LossFn:
        if self._loss_fn is None:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called by the Trainer")
        return self._loss_fn

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run or not trainer.training)

    def progress_label(self, trainer: pl.Trainer) -> str:
        """The label of the SGLD progress bar: the callback's name and the step."""
        return f"{self.name} @ step {trainer.global_step}"

    def on_skip(self, trainer: pl.Trainer, error: NonFiniteCheckpointError) -> dict[str, float]:
        """Called when an estimate is skipped; returns extra history fields (override to add some)."""
        return {}

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        common = {
            "chain_ids": local_chain_ids(self.config.num_chains, trainer),
            "run": self._runs,
            "all_reduce": StrategySum(trainer),
            "forward_context": forward_context(trainer),
            "progress": sgld_progress(trainer, self.progress, self.progress_label(trainer)),
        }
        start = time.perf_counter()
        try:
            result, row = self.estimate(trainer, estimation_module(trainer), common)
        except NonFiniteCheckpointError as error:  # same on every rank: the checks precede any collective
            self._runs += 1
            self._last_step = trainer.global_step
            seconds = time.perf_counter() - start
            self.history.append(
                {
                    "step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "seconds": seconds,
                    "skipped": 1.0,
                    **self.on_skip(trainer, error),
                }
            )
            rank_zero_warn(
                f"{type(self).__name__} ({self.name}) skipped its estimate at step {trainer.global_step}: "
                f"{error}. Nothing is logged for this step; training continues.",
                category=NonFiniteLossWarning,
            )
            return
        seconds = time.perf_counter() - start
        self._runs += 1
        self._last_step = trainer.global_step
        self.history.append(
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "seconds": seconds, **row}
        )
        self.log_result(trainer, pl_module, result, on_step)


def _estimated_steps(trainer: pl.Trainer) -> int:
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:
        return -1
