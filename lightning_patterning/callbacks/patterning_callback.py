"""``PatterningCallback``: re-weight the training data online by inverting the linear response.

At each scheduled step: estimate ``χ`` at the current weights (the susceptibility machinery), turn the
target into ``dμ``, solve ``dh = χ†·dμ`` (docs/concepts/patterning.md; for the multiplicative rule in
log-weight coordinates, ``solve_log_weights``), update the sampler's weights, and log the
prediction ``dμ_pred = nβ·χ·Δm`` (``Δm``: change of the probability mass of each column) next to the change
of ``μ`` realized by the next estimate (the closed-loop check; it also contains ordinary training drift).

Tokens as samples: when the DataModule holds a token rule (``PatterningDataModule(token_classes=...)``),
the columns are the probe tokens and each update changes the rule's class weights instead of the sampler's
(``patterning.tokens.update_token_rule``; docs/how-to/tokens-as-samples.md).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.susceptibility_callback import SusceptibilityCallback
from lightning_patterning.data.sampler import WeightedDistributedSampler
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.observables import Observable
from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights
from lightning_patterning.patterning.targets import Target
from lightning_patterning.patterning.tokens import TokenWeightRule, probe_token_classes, update_token_rule
from lightning_patterning.patterning.weights import UpdateRule, WeightUpdate
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.functional import LossFn

SolveCoordinates = Literal["auto", "log_weights", "mass"]
_COORDINATES = ("auto", "log_weights", "mass")


class PatterningCallback(SusceptibilityCallback):
    """Online patterning: every scheduled step, ``χ`` → ``dh = χ†dμ`` → new sampler weights.

    The data axis follows the sampler: with per-group weights the columns are the groups (all training
    samples are probed, ``probe_size`` of them evenly spaced); with per-sample weights the columns are
    ``probe_size`` evenly spaced training samples and ``dh = 0`` for samples outside the probe.

    Logged: everything ``SusceptibilityCallback`` logs, plus ``patterning/ess_fraction`` (effective sample
    size / N), ``patterning/floor_fraction``, ``patterning/min_weight``, ``patterning/max_weight``,
    ``patterning/predicted_dmu/{observable}``, ``patterning/realized_dmu/{observable}`` (at the next
    estimate), ``patterning/active`` and the TensorBoard histogram ``patterning/weights``.

    With a token rule in the DataModule (``PatterningDataModule(token_classes=...)``, tokens as samples) the
    columns are the probe samples' valid tokens, and each update fits the rule's class weights to the
    per-token solve (``patterning.tokens.update_token_rule``); the sampler's weights stay as they are. Also
    logged then: ``{name}/token_weights/class/{class}``, the histogram ``{name}/token_weights/per_token``
    and ``{name}/token_weights/heldout_r`` (the held-out correlation of the class rule).

    Args:
        config: SGLD settings.
        observables: the observables the target refers to.
        target: ``lp.targets.Shift``, ``Goal`` or ``PrincipalDirection``.
        strength: α, the largest log-change (multiplicative) or change (additive) of a weight per update.
        rule: ``"multiplicative"`` (exponentiated gradient) or ``"additive"`` (with a floor).
        floor: lowest weight of the additive rule, as a fraction of the mean weight.
        max_change: bound on ``ρ'/ρ`` per update (``[1/(1+m), 1+m]``); ``None``: no bound.
        smoothing: η, pull toward uniform weights at each update.
        rtol: relative rank cut-off of the pseudo-inverse. ridge: Tikhonov damping of the solve.
        coordinates: what ``dh`` changes. ``"log_weights"``: the columns' log-weights, solved with
            ``solve_log_weights`` (the first-order effect of a multiplicative update, which weights each
            column by its probability mass; least Fisher norm); ``"mass"``: the columns' mean-1 weights,
            ``dh = χ†·dμ`` read as given (exact for the additive rule). ``"auto"``: ``"log_weights"`` for
            the multiplicative rule, ``"mass"`` for the additive one. With the multiplicative rule,
            ``"mass"`` lets a held observable drift when the columns' masses differ.
        one_off: compute the weights once (at the first scheduled step) and keep them.
        susceptibilities: path of a saved ``Susceptibilities`` (e.g. measured at reference solutions):
            the weights are computed from it once at the start of training and kept (no SGLD during training).

    ``probe``, ``probe_indices``, ``probe_size``, ``loss_batches``, the schedule and the remaining
    arguments are as in ``SusceptibilityCallback``.
    """

    def __init__(
        self,
        config: SGLDConfig | None = None,
        observables: list[Observable] | None = None,
        target: Target | None = None,
        strength: float = 0.5,
        rule: UpdateRule = "multiplicative",
        floor: float = 0.05,
        max_change: float | None = None,
        smoothing: float = 0.0,
        rtol: float = 1e-3,
        ridge: float = 0.0,
        coordinates: SolveCoordinates = "auto",
        one_off: bool = False,
        susceptibilities: str | None = None,
        probe: Dataset | None = None,
        probe_indices: list[int] | None = None,
        probe_size: int = 512,
        loss_batches: int = 4,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_steps: int | None = None,
        first_step: int = 1,
        last_step: int | None = None,
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        save_dir: str | None = None,
        name: str = "patterning",
        progress: bool = True,
    ) -> None:
        if susceptibilities is not None and every_n_train_steps is None and every_n_epochs is None:
            log_spaced_steps = log_spaced_steps or 1  # a schedule is required but never used
        super().__init__(
            config,
            observables,
            probe,
            probe_indices,
            probe_size,
            None,
            loss_batches,
            every_n_train_steps,
            every_n_epochs,
            log_spaced_steps,
            first_step,
            last_step,
            loss_fn,
            dataloader,
            save_dir,
            name,
            progress,
        )
        if not isinstance(target, Target):
            raise TypeError(
                f"target must be an lp.targets.Target (Shift, Goal, PrincipalDirection), got {target!r}"
            )
        target.check_names([o.name for o in self.observables])
        if not (isinstance(rtol, (int, float)) and rtol >= 0) or not (
            isinstance(ridge, (int, float)) and ridge >= 0
        ):
            raise ValueError(f"rtol and ridge must be numbers >= 0, got rtol={rtol!r}, ridge={ridge!r}")
        self.target = target
        self.update = WeightUpdate(strength, rule, floor, max_change, smoothing)
        self.rtol, self.ridge = float(rtol), float(ridge)
        if coordinates not in _COORDINATES:
            raise ValueError(f"coordinates must be one of {_COORDINATES}, got {coordinates!r}")
        if coordinates == "auto":
            coordinates = "log_weights" if rule == "multiplicative" else "mass"
        self.coordinates = coordinates
        self.one_off = one_off
        self.susceptibilities_path = susceptibilities
        self._frozen = False
        self._pending: dict[str, Any] | None = None  # μ and predicted dμ of the last update

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = _weighted_sampler(trainer)
        if self.susceptibilities_path is not None:
            if not self._frozen:
                chi = Susceptibilities.load(self.susceptibilities_path)
                self.target.check_names(chi.names)
                self._apply(trainer, sampler, chi)
                self._frozen = True
            return
        super().on_train_start(trainer, pl_module)

    def should_run(self, step: int, epoch: int) -> bool:
        return not self._frozen and super().should_run(step, epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "frozen": self._frozen, "pending": self._pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._frozen = bool(state_dict.get("frozen", False))
        self._pending = state_dict.get("pending")

    # ------------------------------------------------------------------ work

    def estimate_probe(self, trainer: pl.Trainer) -> tuple[Dataset, list[int], list[Any] | None]:
        """Probe = training samples; with group weights, columns are the sampler's groups."""
        dataset, indices, _ = super().estimate_probe(trainer)
        sampler = _weighted_sampler(trainer)
        if sampler.groups is None or _token_rule(trainer) is not None:
            return dataset, indices, None
        return dataset, indices, [int(sampler.groups[i]) for i in indices]

    def estimate(
        self, trainer: pl.Trainer, module: nn.Module, common: dict[str, Any]
    ) -> tuple[Susceptibilities, dict[str, Any]]:
        chi, row = super().estimate(trainer, module, common)
        if self._pending is not None:
            for name, before in self._pending["mu"].items():
                row[f"realized_dmu/{name}"] = float(chi.mu[chi.names.index(name)]) - before
        if self.target.reached(chi):
            row["active"] = 0.0
            self._pending = None
            return chi, row
        if not bool(torch.isfinite(chi.flattened().matrix).all()):  # e.g. all chains diverged: keep weights
            rank_zero_warn(
                f"PatterningCallback: the estimate at step {trainer.global_step} is not finite (diverged "
                f"chains: {chi.diverged_chains}); the weights are left unchanged. Lower SGLDConfig.lr or "
                "raise divergence_factor if this repeats."
            )
            row["active"] = 0.0
            self._pending = None
            return chi, row
        row.update(self._apply(trainer, _weighted_sampler(trainer), chi))
        row["active"] = 1.0
        if self.one_off:
            self._frozen = True
        return chi, row

    def _apply(self, trainer: pl.Trainer, sampler: WeightedDistributedSampler, chi: Susceptibilities) -> dict:
        if _token_rule(trainer) is not None:
            return self._apply_tokens(trainer, chi)
        matrix, dmu = self.target.resolve(chi)
        old = sampler.weights.double()
        columns = _column_positions(chi, sampler)
        if self.coordinates == "log_weights":
            mass = old[columns] / old.sum()
            dh_columns = solve_log_weights(matrix, dmu, mass, rtol=self.rtol, ridge=self.ridge)
        else:  # dh is a change of (mean-1) weights, i.e. of probability mass
            dh_columns = solve_intervention(matrix, dmu, rtol=self.rtol, ridge=self.ridge)
        dh = torch.zeros_like(old)
        dh[columns] = dh_columns.double()
        new, info = self.update.apply(old, dh)
        sampler.set_weights(new)
        delta_mass = (new - old / old.mean())[columns] / len(new)
        predicted = chi.nbeta * (chi.matrix.double() @ delta_mass)
        self._pending = {"mu": {n: float(m) for n, m in zip(chi.names, chi.mu, strict=True)}}
        row = {f"predicted_dmu/{n}": float(p) for n, p in zip(chi.names, predicted, strict=True)}
        row.update(info)
        if info["floor_fraction"] > 0.5:
            rank_zero_warn(
                f"PatterningCallback: {info['floor_fraction']:.0%} of the weights sit at the floor."
            )
        return row

    def _apply_tokens(self, trainer: pl.Trainer, chi: Susceptibilities) -> dict:
        """Tokens as samples: fit the DataModule's token rule to the per-token solve."""
        rule = _token_rule(trainer)
        assert rule is not None
        if not chi.per_token:
            raise MisconfigurationException(
                "PatterningCallback: the DataModule has a token rule (token_classes=...) but the loss "
                "function returns per-sample losses; return per-position losses [B, T] (tokens as samples)"
            )
        probe, indices, _ = self.estimate_probe(trainer)
        classes = probe_token_classes(rule, probe, indices)
        update = (self.target, rule, classes, self.update, self.coordinates, self.rtol, self.ridge)
        row = update_token_rule(chi, *update)
        self._pending = {"mu": {n: float(m) for n, m in zip(chi.names, chi.mu, strict=True)}}
        prefix, step = f"{self.name}/token_weights", trainer.global_step
        tensorboard.log_token_weights(trainer, rule, step, prefix=prefix)
        if math.isfinite(row["heldout_r"]):
            tensorboard.log_scalars(trainer, {f"{prefix}/heldout_r": row["heldout_r"]}, step)
        return row

    def log_result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: Susceptibilities, on_step: bool
    ) -> None:
        super().log_result(trainer, pl_module, result, on_step)
        row = self.history[-1]
        keys = ("ess_fraction", "floor_fraction", "min_weight", "max_weight", "active")
        scalars = {f"patterning/{k}": float(v) for k, v in row.items() if k in keys or "dmu/" in k}
        tensorboard.log_scalars(trainer, scalars, trainer.global_step)
        for key, value in scalars.items():
            if math.isfinite(value):
                pl_module.log(key, value, on_step=on_step, on_epoch=not on_step, logger=False)
        weights = _weighted_sampler(trainer).weights
        for writer in tensorboard.tensorboard_writers(trainer, "histograms"):
            if trainer.is_global_zero:
                writer.add_histogram("patterning/weights", weights, global_step=trainer.global_step)


def _weighted_sampler(trainer: pl.Trainer) -> WeightedDistributedSampler:
    """The ``WeightedDistributedSampler`` of the training DataLoader, or a clear error."""
    datamodule = getattr(trainer, "datamodule", None)
    sampler = getattr(datamodule, "sampler", None)
    if sampler is None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, WeightedDistributedSampler):
        raise MisconfigurationException(
            "PatterningCallback needs the training data to be drawn by lp.WeightedDistributedSampler: wrap "
            "your DataModule in lp.PatterningDataModule(...) or your DataLoader with "
            "lightning_patterning.data.weighted_dataloader(...)."
        )
    return sampler


def _token_rule(trainer: pl.Trainer) -> TokenWeightRule | None:
    """The token-weight rule of the Trainer's ``PatterningDataModule`` (``None`` without one)."""
    return getattr(getattr(trainer, "datamodule", None), "token_rule", None)


def _column_positions(chi: Susceptibilities, sampler: WeightedDistributedSampler) -> torch.Tensor:
    """Positions in the sampler's weight vector of the matrix columns (groups or probe samples)."""
    if chi.group_names is not None:
        return torch.tensor([int(name) for name in chi.group_names], dtype=torch.long)
    return chi.sample_ids.long()
