"""``PatterningCallback``: re-weight the training data online by inverting the linear response.

At each scheduled step: estimate ``χ`` at the current weights (the susceptibility machinery), turn the
target into ``dμ``, scale the step by the noise gate (``patterning.gate.noise_gate``: no step while ``χ̂``
does not respond to the target beyond its standard errors), solve ``dh = χ†·dμ`` (docs/concepts/patterning.md;
for the multiplicative rule in log-weight coordinates, ``solve_log_weights``), update the sampler's weights,
and log the prediction ``dμ_pred = nβ·χ·Δm`` (``Δm``: change of the probability mass of each column) next to
the change of ``μ`` realized by the next estimate (the closed-loop check; it also contains ordinary training
drift). A skipped or non-finite estimate leaves the weights as they are.

Tokens as samples: when the DataModule holds a token rule (``PatterningDataModule(token_classes=...)``),
the columns are the probe tokens and each update changes the rule's class weights instead of the sampler's
(``patterning.tokens.update_token_rule``; docs/how-to/tokens-as-samples.md).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_patterning.callbacks import tensorboard
from lightning_patterning.callbacks.susceptibility_callback import SusceptibilityCallback
from lightning_patterning.data.sampler import WeightedDistributedSampler
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.observables import Observable
from lightning_patterning.patterning.gate import noise_gate
from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights
from lightning_patterning.patterning.targets import Target
from lightning_patterning.patterning.tokens import TokenWeightRule, probe_token_classes, update_token_rule
from lightning_patterning.patterning.weights import UpdateRule, WeightUpdate, sampling_summary
from lightning_patterning.sgld.config import SGLDConfig
from lightning_patterning.sgld.divergence import NonFiniteCheckpointError
from lightning_patterning.sgld.functional import LossFn

SolveCoordinates = Literal["auto", "log_weights", "mass"]
_COORDINATES = ("auto", "log_weights", "mass")
MASS_SCALARS = 32  # log one scalar per column mass up to this many columns
ESS_WARNING = 0.5  # warn when the effective sample size falls below this fraction of N
MASS_WARNING = 0.01  # warn when a group's probability mass falls below this


class PatterningCallback(SusceptibilityCallback):
    """Online patterning: every scheduled step, ``χ`` → ``dh = χ†dμ`` → new sampler weights.

    The data axis follows the sampler: with per-group weights the columns are the groups (all training
    samples are probed, ``probe_size`` of them evenly spaced); with per-sample weights the columns are
    ``probe_size`` evenly spaced training samples and ``dh = 0`` for samples outside the probe.

    Logged (every tag starts with ``name``): everything ``SusceptibilityCallback`` logs, plus
    ``{name}/gate`` (the noise gate's scale of the step, 0–1) and ``{name}/snr`` (its signal-to-noise
    ratio), ``{name}/ess_fraction`` (effective sample size of the training draw / N, 1 at the natural mix),
    ``{name}/floor_fraction``, ``{name}/min_weight``, ``{name}/max_weight``,
    ``{name}/predicted_dmu/{observable}``, ``{name}/realized_dmu/{observable}`` (at the next estimate),
    ``{name}/active`` (1 when the weights changed), ``{name}/mass/{column}`` (each column's probability
    mass, when there are at most 32 columns; also at the start of training) and the TensorBoard histogram
    ``{name}/weights``. It warns when the effective sample size falls below half of N or a group's mass
    falls below 1 %.

    With a token rule in the DataModule (``PatterningDataModule(token_classes=...)``, tokens as samples) the
    columns are the probe samples' valid tokens, and each update fits the rule's class weights to the
    per-token solve (``patterning.tokens.update_token_rule``); the sampler's weights stay as they are. Also
    logged then: ``{name}/token_weights/class/{class}``, the histogram ``{name}/token_weights/per_token``
    and ``{name}/token_weights/heldout_r`` (the held-out correlation of the class rule).

    Args:
        config: SGLD settings.
        observables: the observables the target refers to.
        target: ``lp.targets.Shift``, ``Goal`` or ``PrincipalDirection``.
        strength: α, the largest log-change (multiplicative) or change (additive) of a weight per update,
            before the noise gate scales it.
        rule: ``"multiplicative"`` (exponentiated gradient) or ``"additive"`` (with a floor).
        floor: lowest weight of the additive rule, as a fraction of the mean weight.
        max_change: bound on ``ρ'/ρ`` per update (``[1/(1+m), 1+m]``; default 1: at most halve or double a
            weight); ``None``: no bound.
        noise_gate: ``k`` of the noise gate (``patterning.gate.noise_gate``): no step while the
            signal-to-noise ratio of ``χ̂`` along the target is below ``k``, full strength from ``2k`` on,
            linear in between; ``None``: no gate (every update has full strength).
        smoothing: η, pull toward uniform weights at each update.
        rtol: relative rank cut-off of the pseudo-inverse. ridge: Tikhonov damping of the solve.
        coordinates: what ``dh`` changes. ``"log_weights"``: the columns' log-weights, solved with
            ``solve_log_weights`` (the first-order effect of a multiplicative update, which weights each
            column by its probability mass; least Fisher norm); ``"mass"``: the columns' mean-1 weights,
            ``dh = χ†·dμ`` read as given (exact for the additive rule). ``"auto"``: ``"log_weights"`` for
            the multiplicative rule, ``"mass"`` for the additive one. With the multiplicative rule,
            ``"mass"`` lets a held observable drift when the columns' masses differ.
        one_off: compute the weights once (at the first scheduled step whose update is applied, i.e. not
            skipped, non-finite or gated off) and keep them.
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
        max_change: float | None = 1.0,
        noise_gate: float | None = 2.0,
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
        if noise_gate is not None and not (
            isinstance(noise_gate, (int, float)) and math.isfinite(noise_gate) and noise_gate > 0
        ):
            raise ValueError(f"noise_gate must be a finite number > 0 or None, got {noise_gate!r}")
        self.target = target
        self.update = WeightUpdate(strength, rule, floor, max_change, smoothing)
        self.noise_gate = None if noise_gate is None else float(noise_gate)
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

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sampler = _weighted_sampler(trainer)
        if self.susceptibilities_path is not None:
            if not self._frozen:
                chi = Susceptibilities.load(self.susceptibilities_path)
                self.target.check_names(chi.names)
                self._apply(trainer, sampler, chi)
                self._frozen = True
        else:
            super().on_train_start(trainer, pl_module)
        self._log_masses(trainer, sampler)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.name
        charts = {
            **self.layout(),
            f"{n}: predicted and realized dμ": [f"^{n}/(predicted|realized)_dmu/"],
            f"{n}: noise gate": [f"^{n}/(gate|snr)$"],
            f"{n}: weights": [f"^{n}/(ess_fraction|floor_fraction|min_weight|max_weight|active)$"],
            f"{n}: probability mass": [f"^{n}/mass/"],
        }
        tensorboard.add_layout(trainer, n, charts)

    def should_run(self, step: int, epoch: int) -> bool:
        return not self._frozen and super().should_run(step, epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "frozen": self._frozen,
            "pending": self._pending,
            "target": self.target.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._frozen = bool(state_dict.get("frozen", False))
        self._pending = state_dict.get("pending")
        self.target.load_state_dict(state_dict.get("target", {}))

    def on_skip(self, trainer: pl.Trainer, error: NonFiniteCheckpointError) -> dict[str, float]:
        self._pending = None  # the weights are unchanged
        return {"active": 0.0}

    # ------------------------------------------------------------------ work

    def estimate_probe(self, trainer: pl.Trainer) -> tuple[Dataset, list[int], list[Any] | None]:
        """Probe = training samples; with group weights, columns are the sampler's groups."""
        dataset, indices, _ = super().estimate_probe(trainer)
        sampler = _weighted_sampler(trainer)
        if sampler.groups is None or _token_rule(trainer) is not None:
            return dataset, indices, None
        return dataset, indices, sampler.groups.tolist()

    def estimate(
        self, trainer: pl.Trainer, module: nn.Module, common: dict[str, Any]
    ) -> tuple[Susceptibilities, dict[str, Any]]:
        chi, row = super().estimate(trainer, module, common)
        if self._pending is not None:
            for name, before in self._pending["mu"].items():
                row[f"realized_dmu/{name}"] = float(chi.mu[chi.names.index(name)]) - before
        self._pending = None
        if self.target.reached(chi):
            row["active"] = 0.0
            return chi, row
        if not bool(torch.isfinite(chi.flattened().matrix).all()):  # e.g. all chains diverged: keep weights
            rank_zero_warn(
                f"PatterningCallback ({self.name}): the estimate at step {trainer.global_step} is not finite "
                f"(diverged chains: {chi.diverged_chains}); the weights are left unchanged. Lower "
                "SGLDConfig.lr or raise divergence_factor if this repeats."
            )
            row["active"] = 0.0
            return chi, row
        row.update(self._apply(trainer, _weighted_sampler(trainer), chi))
        if self.one_off and row["active"]:
            self._frozen = True
        return chi, row

    def _apply(self, trainer: pl.Trainer, sampler: WeightedDistributedSampler, chi: Susceptibilities) -> dict:
        """Gate, solve and update the sampler's weights; returns the history fields of the update."""
        if _token_rule(trainer) is not None:
            return self._apply_tokens(trainer, chi)
        matrix, dmu = self.target.resolve(chi)
        row: dict[str, float] = {}
        scale = 1.0
        if self.noise_gate is not None:
            gate = noise_gate(matrix, self.target.errors(chi), dmu, k=self.noise_gate, dof=_error_dof(chi))
            row.update(gate.info())
            scale = gate.scale
        if scale == 0.0:
            row["active"] = 0.0
            return row
        old = sampler.weights.double()
        columns = _column_positions(chi, sampler)
        if self.coordinates == "log_weights":
            mass = old[columns] / old.sum()
            dh_columns = solve_log_weights(matrix, dmu, mass, rtol=self.rtol, ridge=self.ridge)
        else:  # dh is a change of (mean-1) weights, i.e. of probability mass
            dh_columns = solve_intervention(matrix, dmu, rtol=self.rtol, ridge=self.ridge)
        dh = torch.zeros_like(old)
        dh[columns] = dh_columns.double()
        update = replace(self.update, strength=self.update.strength * scale)
        new, info = update.apply(old, dh)
        sampler.set_weights(new)
        delta_mass = (new / new.sum() - old / old.sum())[columns]
        predicted = chi.nbeta * (chi.matrix.double() @ delta_mass)
        self._pending = {"mu": {n: float(m) for n, m in zip(chi.names, chi.mu, strict=True)}}
        row.update({f"predicted_dmu/{n}": float(p) for n, p in zip(chi.names, predicted, strict=True)})
        row.update(info)
        row.update(sampling_summary(new, sampler.group_sizes))
        row["active"] = 1.0
        self._warn_about_weights(trainer, old, new, sampler, row)
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
        row["active"] = 1.0
        return row

    def _warn_about_weights(
        self,
        trainer: pl.Trainer,
        old: torch.Tensor,
        new: torch.Tensor,
        sampler: WeightedDistributedSampler,
        row: dict[str, float],
    ) -> None:
        step, owner = trainer.global_step, f"PatterningCallback ({self.name})"
        if row["floor_fraction"] > 0.5:
            rank_zero_warn(
                f"{owner} at step {step}: {row['floor_fraction']:.0%} of the weights sit at the floor."
            )
        if row["ess_fraction"] < ESS_WARNING:
            rank_zero_warn(
                f"{owner} at step {step}: the effective sample size of the training draw fell to "
                f"{row['ess_fraction']:.0%} of the data (below {ESS_WARNING:.0%}); lower strength or "
                "max_change, or add smoothing."
            )
        if sampler.groups is not None:
            before, after = old / old.sum(), new / new.sum()
            fallen = torch.nonzero((before >= MASS_WARNING) & (after < MASS_WARNING)).flatten().tolist()
            if fallen:
                masses = ", ".join(f"{g}: {float(after[g]):.2%}" for g in fallen)
                rank_zero_warn(
                    f"{owner} at step {step}: group(s) fell below {MASS_WARNING:.0%} of the probability "
                    f"mass ({masses})."
                )

    def _log_masses(self, trainer: pl.Trainer, sampler: WeightedDistributedSampler) -> None:
        """One scalar per column's probability mass (``{name}/mass/{column}``), for at most 32 columns."""
        weights = sampler.weights
        if len(weights) <= MASS_SCALARS:
            mass = weights / weights.sum()
            scalars = {f"{self.name}/mass/{g}": float(m) for g, m in enumerate(mass)}
            tensorboard.log_scalars(trainer, scalars, trainer.global_step)

    def log_result(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, result: Susceptibilities, on_step: bool
    ) -> None:
        super().log_result(trainer, pl_module, result, on_step)
        row = self.history[-1]
        keys = ("gate", "snr", "ess_fraction", "floor_fraction", "min_weight", "max_weight", "active")
        scalars = {f"{self.name}/{k}": float(v) for k, v in row.items() if k in keys or "dmu/" in k}
        self.log_scalars(trainer, pl_module, scalars, on_step)
        sampler = _weighted_sampler(trainer)
        self._log_masses(trainer, sampler)
        for writer in tensorboard.tensorboard_writers(trainer, "histograms"):
            if trainer.is_global_zero:
                writer.add_histogram(f"{self.name}/weights", sampler.weights, global_step=trainer.global_step)


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


def _error_dof(chi: Susceptibilities) -> int | None:
    """Degrees of freedom of ``chi.stderr``, a jackknife over the chains that did not diverge: chains − 1
    (``None`` when the result does not say how many chains it had)."""
    chains = chi.config.get("num_chains")
    if not isinstance(chains, int):
        return None
    return chains - max(chi.diverged_chains.values(), default=0) - 1


def _column_positions(chi: Susceptibilities, sampler: WeightedDistributedSampler) -> torch.Tensor:
    """Positions in the sampler's weight vector of the matrix columns (groups or probe samples)."""
    if chi.group_names is not None:
        return torch.tensor([int(name) for name in chi.group_names], dtype=torch.long)
    return chi.sample_ids.long()


def _token_rule(trainer: pl.Trainer) -> TokenWeightRule | None:
    """The token-weight rule of the Trainer's ``PatterningDataModule`` (``None`` without one)."""
    return getattr(getattr(trainer, "datamodule", None), "token_rule", None)


def _column_positions(chi: Susceptibilities, sampler: WeightedDistributedSampler) -> torch.Tensor:
    """Positions in the sampler's weight vector of the matrix columns (groups or probe samples)."""
    if chi.group_names is not None:
        return torch.tensor([int(name) for name in chi.group_names], dtype=torch.long)
    return chi.sample_ids.long()
