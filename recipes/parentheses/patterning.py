"""Patterning pieces of the parentheses recipe: the data axis, fixed weights and the online arm.

* **Data axis.** ``group_keys`` puts every training string in a group: TRUE strings by (max depth, capped
  at 6) × length bucket, FALSE strings by (count imbalance, capped at 8) × length bucket (lengths ≤ 8,
  10–14, 16–20) — about 20–30 groups. ``Sampling`` (the CLI's ``sampling:`` section) wraps the data in
  ``lp.PatterningDataModule(groups=...)`` with starting weights = the groups' sizes (natural mass),
  natural mass × exp(strength·δ̂) along a saved direction (one-off patterning), or per-sample
  ``heuristic_weights`` (optionally ``class_balanced``).
* **Online arms.** ``ProbePatterning`` is ``lp.PatterningCallback`` with the observable
  ``ProbeLoss("ood_nested", data.ood_probe_nested)`` (held-out OOD strings labelled FALSE, NESTED's
  answer) and the target ``Shift({"ood_nested": shift})``: ``shift = −1`` lowers that loss (favours
  NESTED), ``shift = +1`` raises it (favours EQUAL-COUNT). The probe data comes from the datamodule at
  ``setup``, so YAML only names it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import lightning_patterning as lp
from lightning_patterning.callbacks.patterning_callback import SolveCoordinates
from lightning_patterning.observables import ProbeLoss
from lightning_patterning.sgld.config import SGLDConfig
from recipes.parentheses.data import ParenthesesData, ParenthesesDataset, count_imbalance, max_depth

GROUPINGS = ("depth_length",)
WEIGHTINGS = ("natural", "heuristic", "heuristic_balanced", "direction")
PROBES = {"ood_probe_nested": "ood_nested", "ood_probe_equal": "ood_equal", "dyck_probe": "dyck"}

# ----------------------------------------------------------------------------------------------------
# Data axis and fixed weights


def length_bucket(length: int) -> int:
    """0: length ≤ 8, 1: 10–14, 2: ≥ 16."""
    return 0 if length <= 8 else (1 if length <= 14 else 2)


def group_key(s: str, label: int) -> tuple[int, int, int]:
    """``(label, max depth ≤ 6 for TRUE | count imbalance ≤ 8 for FALSE, length bucket)``."""
    feature = min(max_depth(s), 6) if label == 1 else min(count_imbalance(s), 8)
    return (int(label), feature, length_bucket(len(s)))


def group_keys(dataset: ParenthesesDataset) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Group id of every string (ids ``0 … G−1`` in sorted key order) and the keys of the groups."""
    keys = [group_key(s, int(y)) for s, y in zip(dataset.strings, dataset.labels.tolist(), strict=True)]
    names = sorted(set(keys))
    index = {k: i for i, k in enumerate(names)}
    return [index[k] for k in keys], names


def heuristic_weights(strings: Sequence[str], labels: Sequence[int]) -> torch.Tensor:
    """Per-sample weights: TRUE strings ``1 + max depth``, FALSE strings ``2 / |count imbalance|``."""
    weights = [
        1.0 + max_depth(s) if int(y) == 1 else 2.0 / count_imbalance(s)
        for s, y in zip(strings, labels, strict=True)
    ]
    return torch.tensor(weights, dtype=torch.float64)


def class_balanced(weights: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """``weights`` rescaled within each class so that the class keeps its natural mass: sample ``i`` of
    class ``c`` gets ``w_i · n_c / Σ_{j ∈ c} w_j`` (``n_c`` strings in the class). The ratios inside a class
    are unchanged; what the heuristic does to the TRUE/FALSE prior is removed."""
    labels_t = torch.as_tensor(list(labels))
    balanced = weights.clone().double()
    for c in labels_t.unique():
        members = labels_t == c
        balanced[members] *= members.sum() / balanced[members].sum()
    return balanced


@dataclass
class Sampling:
    """How training strings are drawn (the CLI's ``sampling:`` section).

    Args:
        groups: ``None`` (plain shuffled loader, the baseline study) or ``"depth_length"``: wrap the data
            in ``lp.PatterningDataModule(groups=...)`` with the groups of ``group_keys``.
        weights: ``"natural"`` (group weight = group size), ``"heuristic"`` (per-sample
            ``heuristic_weights``; one weight per sample, no groups), ``"heuristic_balanced"`` (the same
            with each class kept at its natural mass, :func:`class_balanced`) or ``"direction"`` (one-off
            patterning: natural × exp(strength·δ̂), δ̂ = :func:`mean_direction` of the estimates in
            ``direction``).
        seed: seed of the weighted draw; ``None``: the run's ``seed_everything``.
        direction: with ``weights: direction``, a ``direction_check`` result JSON (its ``estimates``).
        strength: α of ``weights: direction``; positive toward NESTED (the solve's direction), negative
            toward EQUAL-COUNT.
    """

    groups: str | None = None
    weights: str = "natural"
    seed: int | None = None
    direction: str | None = None
    strength: float = 1.5


def mean_direction(estimates: Sequence[dict]) -> torch.Tensor:
    """Mean of the estimates' controlled directions ``δ`` (one entry per group of ``estimates[0]["groups"]``),
    scaled to ``max |δ̂| = 1``: the population's direction when the estimates come from several seeds."""
    mean = torch.tensor([e["delta"] for e in estimates], dtype=torch.float64).mean(dim=0)
    return mean / mean.abs().max()


def log_weight_map(groups: Sequence[Sequence[int]], delta: Any) -> dict[tuple[int, ...], float]:
    """``{group key: log-weight change}`` from an estimate's ``groups`` and a direction ``delta``."""
    return {tuple(g): float(d) for g, d in zip(groups, delta, strict=True)}


def direction_weights(
    ids: Sequence[int],
    names: Sequence[tuple[int, ...]],
    log_weights: dict[tuple[int, ...], float],
    strength: float,
) -> torch.Tensor:
    """Group weights ``natural mass × exp(strength · log_weights[g])``; groups not in ``log_weights`` keep
    their natural mass."""
    natural = torch.bincount(torch.tensor(list(ids))).double()
    change = torch.tensor([log_weights.get(tuple(n), 0.0) for n in names], dtype=torch.float64)
    return natural * torch.exp(strength * change)


def wrap(data: ParenthesesData, sampling: Sampling, seed: int) -> lp.PatterningDataModule | ParenthesesData:
    """``data`` wrapped for weighted sampling as ``sampling`` says (unchanged when ``groups`` is None)."""
    if sampling.groups is None:
        return data
    if sampling.groups not in GROUPINGS or sampling.weights not in WEIGHTINGS:
        raise ValueError(f"sampling: groups must be in {GROUPINGS}, weights in {WEIGHTINGS}; got {sampling}")
    draw_seed = seed if sampling.seed is None else sampling.seed
    train = data.train_set
    if sampling.weights in ("heuristic", "heuristic_balanced"):
        labels = train.labels.tolist()
        weights = heuristic_weights(train.strings, labels)
        wrapped = lp.PatterningDataModule(data, groups=None, seed=draw_seed)
        if sampling.weights == "heuristic_balanced":
            weights = class_balanced(weights, labels)
        wrapped.set_weights(weights)
        return wrapped
    ids, names = group_keys(train)
    wrapped = lp.PatterningDataModule(data, groups=ids, seed=draw_seed)
    if sampling.weights == "direction":
        if sampling.direction is None or not Path(sampling.direction).is_file():
            raise ValueError(
                f"sampling.direction must name a direction_check result JSON for weights: direction, "
                f"got {sampling.direction!r}"
            )
        estimates = json.loads(Path(sampling.direction).read_text())["estimates"]
        log_weights = log_weight_map(estimates[0]["groups"], mean_direction(estimates))
        wrapped.set_weights(direction_weights(ids, names, log_weights, sampling.strength))
    else:
        wrapped.set_weights(torch.bincount(torch.tensor(ids)).double())  # natural mass
    return wrapped


def group_masses(data: ParenthesesData, weights: torch.Tensor | None) -> dict[tuple[int, int, int], float]:
    """Probability mass of each group (``depth_length`` keys) under per-group or per-sample ``weights``."""
    ids, names = group_keys(data.train_set)
    ids_t = torch.tensor(ids)
    if weights is None:
        weights = torch.bincount(ids_t).double()
    weights = weights.double()
    if len(weights) == len(ids):  # per sample
        weights = torch.zeros(len(names), dtype=torch.float64).index_add_(0, ids_t, weights)
    mass = weights / weights.sum()
    return {k: float(m) for k, m in zip(names, mass, strict=True)}


# ----------------------------------------------------------------------------------------------------
# Online arm


class ProbePatterning(lp.PatterningCallback):
    """``lp.PatterningCallback`` on one OOD probe of the datamodule: ``Shift({name: shift})``.

    Args:
        probe: ``"ood_probe_nested"`` (OOD strings labelled FALSE, observable ``ood_nested``) or
            ``"ood_probe_equal"`` (labelled TRUE, observable ``ood_equal``).
        shift: target change of the probe's loss (−1: lower it).
        controls: more probes of the datamodule (e.g. ``["dyck_probe"]``: held-out Dyck words labelled
            TRUE, observable ``dyck``) whose losses the target holds fixed (shift 0): the solve
            ``dh = χ†·(shift, 0, …)`` then drops the part of the response that moves them too — for
            ``dyck``, the class-prior direction (answer FALSE more often everywhere).
        probe_max_samples: evaluate the probe loss on its first this many strings (``None``: all).
        noise_gate: as in ``lp.PatterningCallback``, but off by default here: the recorded online arms
            ran without it (and without a ``max_change`` bound).
        config: SGLD settings. The other arguments are ``lp.PatterningCallback``'s.
    """

    def __init__(
        self,
        probe: str = "ood_probe_nested",
        shift: float = -1.0,
        controls: Sequence[str] = (),
        config: SGLDConfig | None = None,
        strength: float = 0.5,
        rule: str = "multiplicative",
        floor: float = 0.05,
        max_change: float | None = None,
        noise_gate: float | None = None,
        rtol: float = 1e-3,
        ridge: float = 0.0,
        coordinates: SolveCoordinates = "auto",
        probe_max_samples: int | None = None,
        probe_size: int = 512,
        loss_batches: int = 4,
        every_n_train_steps: int | None = 100,
        log_spaced_steps: int | None = None,
        first_step: int = 1,
        last_step: int | None = None,
        progress: bool = False,
    ) -> None:
        attributes = [probe, *controls]
        for attribute in attributes:
            if attribute not in PROBES:
                raise ValueError(f"probe and controls must be among {list(PROBES)}, got {attribute!r}")
        if len(set(attributes)) != len(attributes):
            raise ValueError(f"controls must differ from probe and from each other, got {attributes}")
        self.probe_attributes = attributes
        name = PROBES[probe]
        placeholder = TensorDataset(torch.zeros(1))  # replaced by the datamodule's probes at setup
        super().__init__(
            config,
            [ProbeLoss(PROBES[a], placeholder, max_samples=probe_max_samples) for a in attributes],
            lp.targets.Shift({name: float(shift)}),
            strength=strength,
            rule=rule,
            floor=floor,
            max_change=max_change,
            noise_gate=noise_gate,
            rtol=rtol,
            ridge=ridge,
            coordinates=coordinates,
            probe_size=probe_size,
            loss_batches=loss_batches,
            every_n_train_steps=every_n_train_steps,
            log_spaced_steps=log_spaced_steps,
            first_step=first_step,
            last_step=last_step,
            progress=progress,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        for observable, attribute in zip(self.observables, self.probe_attributes, strict=True):
            observable.data = getattr(trainer.datamodule, attribute)
        super().setup(trainer, pl_module, stage)
