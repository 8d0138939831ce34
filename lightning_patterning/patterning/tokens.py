"""Per-token training weights: a rule that gives every training token a weight, and its fit to χ.

Susceptibilities are measured on probe tokens only, but training needs a weight for every token. The rule
generalises through a *pattern class* per token, ``c = token_classes(batch) ∈ {0, …, K−1}`` (e.g. "this
token completes a bigram that occurred earlier in the context"):

    w_{b,t} = ρ_{c(b,t)}                                   (one weight per class)

and the training loss is the self-normalised weighted mean over the batch's valid tokens (``weighted_mean``)

    L_w = Σ_{b,t} m_{bt}·w_{bt}·ℓ_{bt} / Σ_{b,t} m_{bt}·w_{bt}

so the weights have mean 1 over each batch's valid tokens: only ratios between classes matter, like the
sampling probabilities of ``WeightedDistributedSampler``. It is a pure function of the batch and ``ρ``,
so every DDP rank applies the same weights to the same tokens.

Fitting the rule to a patterning solve (docs/concepts/patterning.md, docs/how-to/tokens-as-samples.md):
the solve gives ``dh`` per probe token, ``[N, T]``; the rule's change per class is the mean ``dh`` of the
probe tokens of that class,

    dh_c = mean_{(n,t) valid, c(n,t) = c} dh_{n,t}         (classes without probe tokens: the overall mean)

and ``ρ`` is updated by the usual ``WeightUpdate`` rule with ``dh_c``. ``heldout_correlation`` reports how
well class means predict the ``dh`` of probe tokens they were not fitted on.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_patterning.estimators.probe import ProbeSet
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights
from lightning_patterning.patterning.targets import Target
from lightning_patterning.patterning.weights import WeightUpdate

TokenClasses = Callable[[Any], Tensor]
"""``token_classes(batch) -> LongTensor[B, T]``: a pattern class per position, aligned with the per-position
losses of the same batch."""


class TokenWeightRule:
    """Per-token weights from a pattern class per token: ``w_{b,t} = ρ_{c(b,t)}``.

    Args:
        token_classes: ``fn(batch) -> LongTensor[B, T]`` with classes in ``0 … num_classes − 1``, the shape
            of the per-position losses; or its import path ``"package.module.function"`` (YAML configs).
        num_classes: ``K``, the number of classes.
        class_names: a name per class (for logs); default ``"0" … "K−1"``.

    The state (``state_dict``) is the class weights ``ρ`` (mean 1 over classes) and a version counter.
    """

    def __init__(
        self, token_classes: TokenClasses | str, num_classes: int, class_names: Sequence[str] | None = None
    ) -> None:
        if isinstance(token_classes, str):
            token_classes = _import_callable(token_classes)
        if not callable(token_classes):
            raise TypeError(
                f"token_classes must be callable fn(batch) -> LongTensor[B, T], got {token_classes!r}"
            )
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ValueError(f"class_names must be {num_classes} distinct names, got {list(names)}")
        self.token_classes = token_classes
        self.num_classes = num_classes
        self.class_names = names
        self._weights = torch.ones(num_classes, dtype=torch.float64)
        self._range_checked = False
        self.version = 0

    @property
    def class_weights(self) -> Tensor:
        """A copy of ``ρ`` [K] (float64)."""
        return self._weights.clone()

    def set_class_weights(self, weights: Tensor | Sequence[float]) -> None:
        """Set ``ρ`` (stored normalised to mean 1 over classes; only ratios matter).

        Raises:
            ValueError: not ``K`` finite numbers ``>= 0`` with a sum ``> 0``; the weights in use are kept.
        """
        self._weights = validate_class_weights(weights, self.num_classes)
        self.version += 1

    def classes(self, batch: Any) -> Tensor:
        """``token_classes(batch)``, checked: an integer tensor ``[B, T]`` with values in ``0 … K−1`` (the
        range is checked on CPU tensors, and once on accelerators, where it would synchronise every step)."""
        classes = self.token_classes(batch)
        if not isinstance(classes, Tensor) or classes.is_floating_point() or classes.dtype == torch.bool:
            raise TypeError(f"token_classes(batch) must return an integer tensor [B, T], got {classes!r:.80}")
        if classes.ndim != 2:
            raise ValueError(f"token_classes(batch) must return shape [B, T], got {list(classes.shape)}")
        check_range = classes.device.type == "cpu" or not self._range_checked  # a sync on accelerators
        self._range_checked = True
        if (
            check_range
            and classes.numel()
            and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes)
        ):
            raise ValueError(
                f"token_classes(batch) must return classes in 0 … {self.num_classes - 1}, got values in "
                f"[{int(classes.min())}, {int(classes.max())}]"
            )
        return classes

    def __call__(self, batch: Any) -> Tensor:
        """``[B, T]`` weight of every position of ``batch`` (float32, on the classes' device)."""
        classes = self.classes(batch)
        return self._weights.to(device=classes.device, dtype=torch.float32)[classes.long()]

    def state_dict(self) -> dict[str, Any]:
        return {"class_weights": self._weights.clone(), "version": self.version}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._weights = validate_class_weights(state_dict["class_weights"], self.num_classes)
        self.version = int(state_dict["version"])


def validate_class_weights(weights: Tensor | Sequence[float], num_classes: int) -> Tensor:
    """A float64 copy of ``weights`` normalised to mean 1.

    Raises:
        ValueError: not 1-D of length ``num_classes``, NaN/inf, negative, or all zero.
    """
    allowed = f"token weights must be {num_classes} finite numbers >= 0 (one per class) with a sum > 0"
    try:
        tensor = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{allowed}; got {type(weights).__name__} ({error})") from error
    if tensor.shape != (num_classes,):
        raise ValueError(f"{allowed}; got shape {list(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{allowed}; got NaN or inf: {tensor.tolist()}")
    if bool((tensor < 0).any()):
        raise ValueError(f"{allowed}; got negative entries: {tensor.tolist()}")
    if not float(tensor.sum()) > 0:
        raise ValueError(f"{allowed}; got all zeros")
    return tensor / tensor.mean()


def weighted_mean(losses: Tensor, weights: Tensor, mask: Tensor | None = None) -> Tensor:
    """``Σ m·w·ℓ / Σ m·w`` over all entries: the weighted mean loss, weights normalised to mean 1 over the
    valid entries (``mask`` True; all when ``None``). Entries of weight 0 or masked out never enter, even
    when NaN; a batch whose valid entries all weigh 0 gives 0 (no gradient).

    Raises:
        ValueError: ``weights`` (or ``mask``) does not have the shape of ``losses``.
    """
    if weights.shape != losses.shape or (mask is not None and mask.shape != losses.shape):
        raise ValueError(
            f"token weights {list(weights.shape)} (and mask) must have the shape of the per-position losses "
            f"{list(losses.shape)}: token_classes(batch) must align with the loss positions"
        )
    w = weights.to(losses.dtype)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    keep = w > 0
    total = torch.where(keep, w * losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum()
    return total / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


# --------------------------------------------------------------------------- fitting the rule to a solve


def solve_token_dh(
    chi: Susceptibilities,
    target: Target,
    mass: Tensor | None = None,
    rtol: float = 1e-3,
    ridge: float = 0.0,
) -> Tensor:
    """The intervention ``dh`` per probe token, ``[N, T]`` (NaN at invalid positions), for a per-token
    ``chi`` (``[k, N, T]``): the target is resolved on the ``[k, M]`` valid tokens (``chi.flattened()``) and
    solved as in ``PatterningCallback``: ``dh = χ†·dμ`` (``mass=None``: a change of mean-1 token weights)
    or, given the tokens' current probability masses ``mass`` ``[N, T]``, the least-Fisher-norm change of
    their log-weights (``solve_log_weights``, for the multiplicative update).
    """
    if not chi.per_token:
        raise ValueError("solve_token_dh needs a per-token result ([k, N, T]: a loss_fn returning [B, T])")
    valid = chi.token_mask if chi.token_mask is not None else ~torch.isnan(chi.matrix).all(dim=0)
    matrix, dmu = target.resolve(chi.flattened())
    if mass is None:
        flat = solve_intervention(matrix, dmu, rtol=rtol, ridge=ridge)
    else:
        if mass.shape != valid.shape:
            raise ValueError(
                f"mass must have the probe tokens' shape {list(valid.shape)}, got {list(mass.shape)}"
            )
        flat = solve_log_weights(matrix, dmu, mass[valid].to(matrix.dtype), rtol=rtol, ridge=ridge)
    dh = torch.full(valid.shape, math.nan, dtype=torch.float64)
    dh[valid] = flat.double()
    return dh


def class_means(dh: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """``[K]`` mean of ``dh`` over the valid (finite) tokens of each class; a class with no such token gets
    the mean over all valid tokens (no change relative to the others)."""
    if dh.shape != classes.shape:
        raise ValueError(f"classes must have the shape of dh {list(dh.shape)}, got {list(classes.shape)}")
    valid = torch.isfinite(dh)
    if not bool(valid.any()):
        raise ValueError("dh has no finite entry")
    values, index = dh[valid].double(), classes[valid].long()
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=num_classes).double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), values.mean())


def heldout_correlation(dh: Tensor, classes: Tensor, seed: int = 0) -> float:
    """How well the class rule predicts the ``dh`` of probe tokens it was not fitted on: the class means of
    ``dh`` over a random half of the probe sequences (rows, drawn with ``seed``) predict the valid tokens of
    the other half; returns the Pearson correlation of prediction and ``dh`` there (NaN when either is
    constant, e.g. a single class)."""
    if dh.ndim != 2 or dh.shape != classes.shape:
        raise ValueError(
            f"dh and classes must both be [N, T], got {list(dh.shape)} and {list(classes.shape)}"
        )
    if dh.shape[0] < 2:
        raise ValueError("heldout_correlation needs at least 2 probe sequences")
    order = torch.randperm(dh.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, test = order[: dh.shape[0] // 2], order[dh.shape[0] // 2 :]
    num_classes = int(classes.max()) + 1
    means = class_means(dh[fit], classes[fit], num_classes)
    actual, valid = dh[test].double(), torch.isfinite(dh[test])
    predicted = means[classes[test].long()][valid]
    actual = actual[valid]
    if predicted.numel() < 2 or float(predicted.std()) == 0 or float(actual.std()) == 0:
        return math.nan
    return float(torch.corrcoef(torch.stack([predicted, actual]))[0, 1])


def token_patterning_step(
    chi: Susceptibilities,
    target: Target,
    rule: TokenWeightRule,
    probe_classes: Tensor,
    update: WeightUpdate,
    coordinates: str = "auto",
    rtol: float = 1e-3,
    ridge: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """One patterning step of the token rule: ``χ`` → ``dh`` per probe token → ``dh_c`` per class → new ``ρ``.

    Args:
        chi: a per-token result ``[k, N, T]``.
        target: the desired change (``lp.targets``).
        rule: the rule whose class weights ``ρ`` are updated (read only here).
        probe_classes: ``[N, T]`` class of every probe token (``rule.classes`` of the probe batches).
        update: the weight-update settings (strength, multiplicative or additive, ...).
        coordinates: ``"log_weights"`` (``solve_log_weights`` with the probe tokens' current masses),
            ``"mass"`` (``χ†·dμ``), or ``"auto"``: log-weights for the multiplicative rule, else mass.
        rtol: relative rank cut-off of the pseudo-inverse.
        ridge: Tikhonov damping of the pseudo-inverse.

    Returns:
        The new class weights ``[K]`` (mean 1) and diagnostics: the update's (``ess_fraction``, ...), the
        held-out correlation ``heldout_r`` of the class rule, and ``dh/{class}`` per class.
    """
    if coordinates not in ("auto", "log_weights", "mass"):
        raise ValueError(f"coordinates must be 'auto', 'log_weights' or 'mass', got {coordinates!r}")
    if coordinates == "auto":
        coordinates = "log_weights" if update.rule == "multiplicative" else "mass"
    mass = None
    if coordinates == "log_weights":
        current = rule.class_weights[probe_classes.long()]
        mass = current / current.sum()
    dh = solve_token_dh(chi, target, mass, rtol=rtol, ridge=ridge)
    per_class = class_means(dh, probe_classes, rule.num_classes)
    new, info = update.apply(rule.class_weights, per_class)
    info["heldout_r"] = heldout_correlation(dh, probe_classes) if dh.shape[0] >= 2 else math.nan
    info.update({f"dh/{name}": float(v) for name, v in zip(rule.class_names, per_class, strict=True)})
    return new, info


def update_token_rule(
    chi: Susceptibilities,
    target: Target,
    rule: TokenWeightRule,
    probe_classes: Tensor,
    update: WeightUpdate,
    coordinates: str = "auto",
    rtol: float = 1e-3,
    ridge: float = 0.0,
) -> dict[str, float]:
    """``token_patterning_step``, then set the rule's class weights (what ``PatterningCallback`` does with a
    token rule). Returns the step's diagnostics plus ``predicted_dmu/{observable}`` = ``nβ·χ·Δm``, with
    ``Δm`` the change of the probe tokens' probability masses (``m_{n,t} ∝ ρ_{c(n,t)}`` over the probe)."""
    old = rule.class_weights
    new, info = token_patterning_step(chi, target, rule, probe_classes, update, coordinates, rtol, ridge)
    rule.set_class_weights(new)
    flat = chi.flattened()
    valid = chi.token_mask if chi.token_mask is not None else ~torch.isnan(chi.matrix).all(dim=0)
    classes = probe_classes[valid].long()
    before, after = old[classes], new.double()[classes]
    delta_mass = after / after.sum() - before / before.sum()
    predicted = chi.nbeta * (flat.matrix.double() @ delta_mass)
    info.update({f"predicted_dmu/{n}": float(p) for n, p in zip(chi.names, predicted, strict=True)})
    return info


def probe_token_classes(rule: TokenWeightRule, probe: Any, indices: Sequence[int] | None) -> Tensor:
    """``[N, T]`` class of every probe token: ``rule.classes`` of the probe batches, collated as
    ``estimate_susceptibilities`` collates them (so row ``n`` is the result's probe sample ``n``)."""
    probe_set = ProbeSet(probe, indices, None)
    return torch.cat([rule.classes(batch).cpu() for batch in probe_set.batches])


def _import_callable(path: str) -> TokenClasses:
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ValueError(f"token_classes must be an import path 'package.module.function', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"token_classes: cannot import {path!r} ({error})") from error
