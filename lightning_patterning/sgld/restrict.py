"""Weight restrictions: which parameter entries a chain may move (docs/concepts/llc.md).

A restriction to a component C sets ``mask = 1`` on C's entries and ``0`` elsewhere; everything outside C
stays at ``w*``. Parameters that are entirely outside C are not sampled at all (no copies, no weight
gradients); parameters partly inside C carry a per-entry mask, e.g. one attention head's rows of a fused
projection matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

ParamMasks = dict[str, torch.Tensor | None]
"""Parameter name → per-entry mask (same shape, 1 = sampled) or ``None`` (the whole parameter)."""

RestrictSpec = None | str | Sequence[str] | Mapping[str, torch.Tensor | None]
"""``None`` (all trainable parameters), glob pattern(s) on parameter names, or name → mask."""


def resolve_param_masks(model: nn.Module, restrict: RestrictSpec, argument: str = "restrict") -> ParamMasks:
    """Turn a restriction spec into ``{parameter name: mask or None}`` for ``model``.

    Patterns are shell-style globs (``fnmatch``) matched against ``model.named_parameters()`` names,
    e.g. ``"blocks.0.attn.*"``. Only parameters with ``requires_grad=True`` are sampled; frozen ones
    stay at ``w*``.

    Raises:
        ValueError: the model has no trainable parameter, a pattern or name matches no trainable
            parameter, a mask has the wrong shape or is all zero, or nothing at all would be sampled.
        TypeError: ``restrict`` is of an unsupported type.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params and restrict is None:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every parameter has requires_grad=False), "
            "so SGLD has nothing to sample; estimate at a model whose parameters require gradients"
        )
    if not params:
        raise ValueError(
            f"{argument}: {type(model).__name__} has no trainable parameters to restrict to (every "
            "parameter has requires_grad=False)"
        )
    if restrict is None:
        return {name: None for name in params}
    if isinstance(restrict, str):
        restrict = [restrict]
    if isinstance(restrict, Mapping):
        return _masks_from_mapping(params, restrict, argument)
    if isinstance(restrict, Sequence):
        return _masks_from_patterns(params, list(restrict), argument)
    raise TypeError(
        f"{argument} must be None, a glob pattern, a list of patterns or a mapping name -> mask, "
        f"got {type(restrict).__name__}"
    )


def _masks_from_patterns(
    params: Mapping[str, torch.Tensor], patterns: list[str], argument: str
) -> ParamMasks:
    if not patterns:
        raise ValueError(f"{argument}: an empty list of patterns restricts to nothing; use None for all")
    selected: ParamMasks = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{argument}: patterns must be strings, got {type(pattern).__name__}")
        matches = [name for name in params if fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(
                f"{argument}: pattern {pattern!r} matches no trainable parameter; "
                f"available names: {_preview(params)}"
            )
        selected.update(dict.fromkeys(matches))
    return {name: None for name in params if name in selected}


def _masks_from_mapping(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor | None], argument: str
) -> ParamMasks:
    if not masks:
        raise ValueError(f"{argument}: an empty mapping restricts to nothing; use None for all")
    resolved: ParamMasks = {}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(
                f"{argument}: {name!r} is not a trainable parameter; available names: {_preview(params)}"
            )
        if mask is None:
            resolved[name] = None
            continue
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{argument}: mask for {name!r} has shape {tuple(mask.shape)}, "
                f"expected the parameter's shape {tuple(params[name].shape)}"
            )
        if not bool(mask.ne(0).any()):
            raise ValueError(f"{argument}: mask for {name!r} is all zero; drop the entry instead")
        resolved[name] = mask.ne(0).to(dtype=params[name].dtype, device=params[name].device)
    return {name: resolved[name] for name in params if name in resolved}


def _preview(params: Mapping[str, torch.Tensor], limit: int = 12) -> str:
    names = list(params)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
