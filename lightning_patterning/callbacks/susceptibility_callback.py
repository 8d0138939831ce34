"""``SusceptibilityCallback``: estimate the susceptibility matrix at the checkpoint during training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.base import EstimationCallback
from lightning_patterning.estimators.probe import ProbeSet
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.estimators.susceptibilities import estimate_susceptibilities, restriction_masks
from lightning_patterning.observables import Observable, Restricted, check_observables
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.functional import LossFn
from lightning_patterning.sgld.restrict import resolve_param_masks


class SusceptibilityCallback(EstimationCallback):
    """Estimates ``χ`` [observables × probe samples or groups] on a schedule
    (docs/concepts/susceptibilities.md).

    Logged at ``trainer.global_step`` (every tag starts with ``name``): ``{name}/mu/{observable}``
    (posterior means), ``{name}/abs_mean/{observable}`` and ``{name}/stderr_mean/{observable}`` (row
    summaries), ``{name}/explained_variance/pc{j}``, ``{name}/sgld/diverged_chains`` and
    ``{name}/sgld/seconds``; TensorBoard figures ``{name}/matrix`` (row-standardized heatmap),
    ``{name}/explained_variance`` and ``{name}/pc1_pc2_data`` (scatter of the data loadings); a
    custom-scalars section ``{name}``. Non-finite values are not logged; an estimate skipped because the loss
    at the checkpoint is non-finite logs nothing. Each estimate is saved as
    ``{save_dir}/step{step:08d}.pt`` (``Susceptibilities.load`` reads it) and kept in ``latest`` for other
    code (``PatterningCallback``, a user).

    Args:
        config: SGLD settings.
        observables: ``lp.observables`` instances (``ProbeLoss``, ``LLC``, ``Restricted``, ``Custom``).
        probe: data of the columns; default the SGLD data (training set).
        probe_indices: indices of ``probe`` to use; default ``probe_size`` evenly spaced samples.
        probe_size: number of probe samples when ``probe_indices`` is not given.
        groups: aggregate columns into groups: a field name of the probe's samples (or a sequence attribute
            of its dataset), or one label per sample of the probe dataset (the meaning of
            ``PatterningDataModule(groups=...)``: one id per sample of the dataset). Checked when training
            starts.
        loss_batches: minibatches forming the fixed set on which ``L(w)`` is measured.
        save_dir: where estimates are saved; default ``{logger.log_dir}/{name}``, or no saving without a
            logger.

    The schedule (``every_n_train_steps``, ``every_n_epochs``, ``log_spaced_steps``, ``first_step``,
    ``last_step``), ``loss_fn``, ``dataloader``, ``name`` and ``progress`` are as in ``LLCCallback``.
    """

    def __init__(
        self,
        config: SGLDConfig | None = None,
        observables: list[Observable] | None = None,
        probe: Dataset | None = None,
        probe_indices: list[int] | None = None,
        probe_size: int = 512,
        groups: str | list[Any] | None = None,
        loss_batches: int = 4,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_steps: int | None = None,
        first_step: int = 1,
        last_step: int | None = None,
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        save_dir: str | None = None,
        name: str = "susceptibility",
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
        self.observables = check_observables(observables or [])
        if probe is not None and not isinstance(probe, Dataset):
            raise TypeError(f"probe must be a map-style Dataset or None, got {type(probe).__name__}")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be an int >= 1, got {probe_size!r}")
        if not isinstance(loss_batches, int) or loss_batches < 1:
            raise ValueError(f"loss_batches must be an int >= 1, got {loss_batches!r}")
        self.probe = probe
        self.probe_indices = probe_indices
        self.probe_size = probe_size
        self.groups = groups
        self.loss_batches = loss_batches
        self.save_dir = save_dir
        self.latest: Susceptibilities | None = None

    def check_module(self, module: nn.Module) -> None:
        try:
            resolve_param_masks(module, None)
        except ValueError as error:
            raise MisconfigurationException(f"{type(self).__name__}: {error}") from error
        for observable in self.observables:
            if isinstance(observable, Restricted):
                try:
                    restriction_masks(module, observable)
                except ValueError as error:
                    raise MisconfigurationException(f"SusceptibilityCallback: {error}") from error

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        probe, indices, groups = self.estimate_probe(trainer)
        try:
            ProbeSet(probe, indices, groups)
        except (ValueError, TypeError, IndexError) as error:
            raise MisconfigurationException(f"{type(self).__name__} ({self.name}): {error}") from error

    def estimate_probe(self, trainer: pl.Trainer) -> tuple[Dataset, list[int], Any]:
        """The probe dataset, the indices used (``probe_indices`` or ``probe_size`` evenly spaced ones) and
        the group spec."""
        probe = self.probe if self.probe is not None else self.sgld_data(trainer).dataset
        indices = self.probe_indices
        if indices is None:
            size = len(probe)  # type: ignore[arg-type]
            indices = torch.linspace(0, size - 1, min(size, self.probe_size)).round().long().unique().tolist()
        return probe, indices, self.groups

    def estimate(
        self, trainer: pl.Trainer, module: nn.Module, common: dict[str, Any]
    ) -> tuple[Susceptibilities, dict[str, Any]]:
        probe, indices, groups = self.estimate_probe(trainer)
        result = estimate_susceptibilities(
            module,
            self._require_loss_fn(),
            self.sgld_data(trainer),
            self.config,
            self.observables,
            probe,
            probe_indices=indices,
            groups=groups,
            loss_batches=self.loss_batches,
            **common,
        )
        result.metadata.update(step=trainer.global_step, epoch=trainer.current_epoch)
        self.latest = result
        row = {f"mu/{n}": float(m) for n, m in zip(result.names, result.mu, strict=True)}
        row["diverged_chains"] = float(sum(result.diverged_chains.values()))
        return result, row

    def log_result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: Susceptibilities, on_step: bool
    ) -> None:
        step, n = trainer.global_step, self.name
        view = result.flattened()  # per-token [k, N, T] matrices: the [k, M] valid tokens
        scalars: dict[str, float] = {}
        for i, observable in enumerate(result.names):
            scalars[f"{n}/mu/{observable}"] = float(result.mu[i])
            scalars[f"{n}/abs_mean/{observable}"] = float(view.matrix[i].abs().mean())
            scalars[f"{n}/stderr_mean/{observable}"] = float(view.stderr[i].mean())
        finite = bool(torch.isfinite(view.matrix).all())
        if finite:
            explained = result.explained_variance()
            for j, value in enumerate(explained.tolist()[:8]):
                scalars[f"{n}/explained_variance/pc{j + 1}"] = value
        scalars[f"{n}/sgld/diverged_chains"] = float(sum(result.diverged_chains.values()))
        scalars[f"{n}/sgld/seconds"] = self.history[-1]["seconds"]
        self.log_scalars(trainer, pl_module, scalars, on_step)
        if finite:
            _, _, v = view.pca()
            tensorboard.log_matrix_figures(
                trainer,
                n,
                view.matrix,
                view.names,
                view.columns,
                view.standardized(),
                explained,
                v,
                step,
            )
        directory = self._directory(trainer)
        if directory is not None and trainer.is_global_zero:
            result.save(directory / f"step{step:08d}.pt")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tensorboard.add_layout(trainer, self.name, self.layout())

    def layout(self) -> dict[str, list[str]]:
        """The custom-scalars charts of this callback: chart title → tag regexes."""
        n = self.name
        return {
            f"{n}: posterior means μ": [f"^{n}/mu/"],
            f"{n}: mean |χ| per observable": [f"^{n}/abs_mean/"],
            f"{n}: mean stderr per observable": [f"^{n}/stderr_mean/"],
            f"{n}: explained variance": [f"^{n}/explained_variance/"],
            f"{n}: SGLD": [f"^{n}/sgld/"],
        }

    def _directory(self, trainer: pl.Trainer) -> Path | None:
        if self.save_dir is not None:
            return Path(self.save_dir)
        log_dir = trainer.logger.log_dir if trainer.logger is not None else None
        return Path(log_dir) / self.name if log_dir else None
