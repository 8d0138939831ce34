"""One weight-restricted observable per attention head (Baker et al. 2025, arXiv 2504.18274;
docs/concepts/susceptibilities.md).

``head_restrictions(model)`` finds the attention layers of a model and returns one
``lp.observables.Restricted`` per head, named ``l{layer}h{head}``, whose per-entry masks select that
head's slices of the query/key/value/output projections.

Slicing rule. With ``H`` heads, query/key head size ``d_h = d_q / H`` and value head size
``d_v = d_value / H``, head ``h`` owns

* rows ``h·d_h : (h+1)·d_h`` of ``W_Q`` and ``W_K`` and of their biases,
* rows ``h·d_v : (h+1)·d_v`` of ``W_V`` and of its bias,
* columns ``h·d_v : (h+1)·d_v`` of ``W_O`` (the output projection reads the concatenated head outputs),

and nothing else: the output bias, LayerNorms, embeddings and MLPs are shared by all heads and are in no
head's mask. The masks of a layer's heads are disjoint and together cover exactly the q/k/v/o weights and
q/k/v biases. This is the usual ``view(B, T, H, d_h)`` head split of the projections' outputs.

Layouts recognised (``Linear`` means ``nn.Linear``, weight ``[out, in]``, or Hugging Face's GPT-2
``Conv1D``, weight ``[in, out]``):

* ``torch.nn.MultiheadAttention``: ``in_proj_weight [3d, d]`` (rows q | k | v) or ``q_proj_weight``,
  ``k_proj_weight``, ``v_proj_weight`` when ``kdim``/``vdim`` differ; ``in_proj_bias``; ``bias_k`` and
  ``bias_v`` (``add_bias_kv=True``) are sliced like the key/value biases; ``out_proj.weight`` columns.
* separate ``q_proj``/``k_proj``/``v_proj`` Linears (also ``query``/``key``/``value``, ``q``/``k``/``v``)
  plus an output Linear ``o_proj``/``out_proj``/``c_proj``/``proj``/``o``;
* a fused ``qkv``/``c_attn``/``in_proj``/``qkv_proj``/``Wqkv`` Linear with ``3·d`` outputs, rows
  ``[q (d) | k (d) | v (d)]``, each block split into heads of ``d_h`` rows (nanoGPT, GPT-2, timm); per-head
  interleaved fusions (GPT-NeoX ``query_key_value``) are *not* this layout;
* TransformerLens parameters ``W_Q``, ``W_K``, ``W_V`` ``[H, d_model, d_head]``, ``W_O``
  ``[H, d_head, d_model]`` and biases ``b_Q``, ``b_K``, ``b_V`` ``[H, d_head]``: head ``h`` is index ``h``.

Grouped-query attention (fewer key/value heads than query heads) is refused: its key/value weights are
shared by several heads, so heads are not disjoint components.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_patterning.observables import Restricted

_Q_NAMES = ("q_proj", "query", "q")
_K_NAMES = ("k_proj", "key", "k")
_V_NAMES = ("v_proj", "value", "v")
_FUSED_NAMES = ("qkv", "c_attn", "in_proj", "qkv_proj", "Wqkv")
_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "proj", "o")
_HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads")
_HINT = "pass layers=[...] (the attention modules or their names) and num_heads="


@dataclass(frozen=True)
class _Slice:
    """Head ``h`` owns indices ``offset + h·size : offset + (h+1)·size`` of ``param`` along ``axis``."""

    param: torch.Tensor
    axis: int
    size: int
    offset: int = 0


@dataclass(frozen=True)
class _Projection:
    """A Linear-like layer: its weight, bias and the weight axis that indexes output features."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    out_axis: int

    @property
    def out_features(self) -> int:
        return self.weight.shape[self.out_axis]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 - self.out_axis]

    def rows(self, size: int, offset: int = 0) -> list[_Slice]:
        """Output-feature slices of the weight and bias (what a q/k/v head owns)."""
        slices = [_Slice(self.weight, self.out_axis, size, offset)]
        if self.bias is not None:
            slices.append(_Slice(self.bias, 0, size, offset))
        return slices

    def columns(self, size: int) -> list[_Slice]:
        """Input-feature slices of the weight (what a head owns of the output projection)."""
        return [_Slice(self.weight, 1 - self.out_axis, size)]


def head_restrictions(
    model: nn.Module,
    layers: Sequence[str | nn.Module] | None = None,
    num_heads: int | None = None,
) -> list[Restricted]:
    """Build one ``Restricted`` observable per attention head of ``model``, named ``l{layer}h{head}``.

    Head ``h`` of a layer owns rows ``h·d_h:(h+1)·d_h`` of ``W_Q``, ``W_K``, ``W_V`` and their biases and
    columns ``h·d_h:(h+1)·d_h`` of ``W_O``; every other entry is 0 in its masks (see the module docstring
    for the layouts recognised). Frozen parameters (``requires_grad=False``) are left out of the masks.

    Args:
        model: the model whose parameter names the masks are keyed by.
        layers: the attention modules, in layer order, as modules or as names from
            ``model.named_modules()``; ``None`` finds them (in registration order, not descending into a
            module already recognised as attention).
        num_heads: heads per layer, for modules without a ``num_heads``/``n_heads``/``n_head`` attribute.

    Returns:
        ``layers × heads`` observables ``l0h0, l0h1, …`` with boolean masks shaped like the parameters.

    Raises:
        ValueError: no attention module is found, a module's layout is not recognised or is ambiguous,
            the number of heads is unknown or does not divide the projection sizes, or a given module's
            parameters do not belong to ``model``.
    """
    if num_heads is not None and (not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads must be None or an int >= 1, got {num_heads!r}")
    if layers is None:
        found = _find_attention(model, num_heads)
        if not found:
            raise ValueError(
                f"head_restrictions: no attention module found in {type(model).__name__} (looked for "
                "nn.MultiheadAttention, q_proj/k_proj/v_proj or fused qkv/c_attn/in_proj projections with "
                "an output projection, and TransformerLens W_Q/W_K/W_V/W_O); " + _HINT
            )
    else:
        found = [_layer_layout(name, module, num_heads) for name, module in _named_layers(model, layers)]
    names = {id(p): n for n, p in model.named_parameters()}
    observables: list[Restricted] = []
    for layer, (label, slices, heads) in enumerate(found):
        for head in range(heads):
            masks = _head_masks(slices, head, names, label)
            observables.append(Restricted(f"l{layer}h{head}", masks=masks))
    return observables


def _named_layers(model: nn.Module, layers: Sequence[str | nn.Module]) -> list[tuple[str, nn.Module]]:
    if isinstance(layers, (str, nn.Module)) or not layers:
        raise ValueError(f"layers must be a non-empty list of modules or module names, got {layers!r}")
    modules = dict(model.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    named: list[tuple[str, nn.Module]] = []
    for layer in layers:
        if isinstance(layer, str):
            if layer not in modules:
                attention_like = [n for n in modules if n.rsplit(".", 1)[-1].startswith(("attn", "att"))]
                raise ValueError(
                    f"layers: {type(model).__name__} has no submodule {layer!r}; "
                    f"attention-like names: {attention_like[:8]}"
                )
            named.append((layer, modules[layer]))
        elif isinstance(layer, nn.Module):
            named.append((by_id.get(id(layer), type(layer).__name__), layer))
        else:
            raise ValueError(f"layers: entries must be modules or module names, got {type(layer).__name__}")
    return named


def _find_attention(model: nn.Module, num_heads: int | None) -> list[tuple[str, list[_Slice], int]]:
    found: list[tuple[str, list[_Slice], int]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") or not prefix for prefix, _, _ in found):
            continue  # inside an attention module already recognised
        layout = _layout(name, module, num_heads, required=False)
        if layout is not None:
            found.append((name, *layout))
    return found


def _layer_layout(name: str, module: nn.Module, num_heads: int | None) -> tuple[str, list[_Slice], int]:
    layout = _layout(name, module, num_heads, required=True)
    assert layout is not None
    return (name, *layout)


def _layout(
    name: str, module: nn.Module, num_heads: int | None, required: bool
) -> tuple[list[_Slice], int] | None:
    """The head slices and head count of ``module``; ``None`` if it is not attention (and not required)."""
    label = f"{name or 'the model'} ({type(module).__name__})"
    if isinstance(module, nn.MultiheadAttention):
        return _mha_layout(module, label, num_heads)
    params = dict(module.named_parameters(recurse=False))
    if "W_Q" in params:
        return _lens_layout(params, label, num_heads)
    q, k, v = (_child(module, names, label) for names in (_Q_NAMES, _K_NAMES, _V_NAMES))
    fused = _child(module, _FUSED_NAMES, label)
    separate = [p for p in (q, k, v) if p is not None]
    if fused is not None and separate:
        raise ValueError(f"{label}: has both a fused qkv projection and separate q/k/v ones; " + _HINT)
    if fused is None and len(separate) < 3:
        if required:
            raise ValueError(
                f"{label}: not a recognised attention layout (need q_proj/k_proj/v_proj, a fused qkv, "
                "nn.MultiheadAttention or TransformerLens W_Q/W_K/W_V/W_O); " + _HINT
            )
        return None
    out = _child(module, _OUT_NAMES, label)
    if out is None:
        raise ValueError(f"{label}: found q/k/v projections but no output projection {_OUT_NAMES}; " + _HINT)
    heads = _num_heads(module, label, num_heads)
    if fused is not None:
        d = _divide(fused.out_features, 3, f"{label}: fused qkv out_features")
        dh = _divide(d, heads, f"{label}: fused qkv block size d")
        slices = [s for block in range(3) for s in fused.rows(dh, block * d)]
        dv = dh
    else:
        assert q is not None and k is not None and v is not None
        if k.out_features != q.out_features:
            raise ValueError(
                f"{label}: k_proj has {k.out_features} outputs, q_proj {q.out_features}: grouped-query "
                "attention shares keys/values across heads and is not supported"
            )
        dh = _divide(q.out_features, heads, f"{label}: q_proj out_features")
        dv = _divide(v.out_features, heads, f"{label}: v_proj out_features")
        slices = q.rows(dh) + k.rows(dh) + v.rows(dv)
    if out.in_features != heads * dv:
        raise ValueError(
            f"{label}: the output projection reads {out.in_features} features, expected "
            f"{heads} heads × {dv} value features; " + _HINT
        )
    return slices + out.columns(dv), heads


def _mha_layout(module: nn.MultiheadAttention, label: str, num_heads: int | None) -> tuple[list[_Slice], int]:
    heads = module.num_heads
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"{label}: num_heads={num_heads} but the module has num_heads={heads}")
    d, dh = module.embed_dim, module.head_dim
    slices: list[_Slice] = []
    if module.in_proj_weight is not None:
        slices += [_Slice(module.in_proj_weight, 0, dh, block * d) for block in range(3)]
    else:
        slices += [
            _Slice(w, 0, dh) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        ]
    if module.in_proj_bias is not None:
        slices += [_Slice(module.in_proj_bias, 0, dh, block * d) for block in range(3)]
    slices += [_Slice(b, 2, dh) for b in (module.bias_k, module.bias_v) if b is not None]
    slices.append(_Slice(module.out_proj.weight, 1, dh))
    return slices, heads


def _lens_layout(
    params: dict[str, nn.Parameter], label: str, num_heads: int | None
) -> tuple[list[_Slice], int]:
    missing = [n for n in ("W_K", "W_V", "W_O") if n not in params]
    if missing:
        raise ValueError(f"{label}: has W_Q but no parameter(s) {missing} (grouped-query?); " + _HINT)
    heads = params["W_Q"].shape[0]
    if num_heads is not None and num_heads != heads:
        raise ValueError(f"{label}: num_heads={num_heads} but W_Q has {heads} heads (its first dimension)")
    names = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")
    for n in names:
        if n in params and params[n].shape[0] != heads:
            raise ValueError(f"{label}: {n} has shape {tuple(params[n].shape)}, expected [{heads}, ...]")
    return [_Slice(params[n], 0, 1) for n in names if n in params], heads


def _child(module: nn.Module, names: Sequence[str], label: str) -> _Projection | None:
    present = [n for n in names if isinstance(getattr(module, n, None), nn.Module)]
    if len(present) > 1:
        raise ValueError(f"{label}: ambiguous projections {present} (one expected); " + _HINT)
    if not present:
        return None
    child = getattr(module, present[0])
    weight, bias = getattr(child, "weight", None), getattr(child, "bias", None)
    if isinstance(child, nn.Linear):
        return _Projection(child.weight, child.bias, out_axis=0)
    if (  # Hugging Face GPT-2 Conv1D: weight [in, out], y = x @ W + b
        isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and weight.shape[1] == getattr(child, "nf", None)
    ):
        return _Projection(weight, bias if isinstance(bias, torch.Tensor) else None, out_axis=1)
    raise ValueError(
        f"{label}: {present[0]} is a {type(child).__name__}, not an nn.Linear or Conv1D; " + _HINT
    )


def _num_heads(module: nn.Module, label: str, num_heads: int | None) -> int:
    own = [getattr(module, a) for a in _HEAD_ATTRS if isinstance(getattr(module, a, None), int)]
    if own and num_heads is not None and own[0] != num_heads:
        raise ValueError(f"{label}: num_heads={num_heads} but the module says {own[0]} heads")
    if own:
        return own[0]
    if num_heads is None:
        raise ValueError(f"{label}: the number of heads is unknown ({'/'.join(_HEAD_ATTRS)}); " + _HINT)
    return num_heads


def _divide(total: int, parts: int, what: str) -> int:
    if parts < 1 or total % parts:
        raise ValueError(f"{what} = {total} is not divisible by {parts}; " + _HINT)
    return total // parts


def _head_masks(
    slices: Sequence[_Slice], head: int, names: dict[int, str], label: str
) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for s in slices:
        if id(s.param) not in names:
            raise ValueError(f"{label}: its parameters are not parameters of the model passed in")
        if not s.param.requires_grad:
            continue
        name = names[id(s.param)]
        mask = masks.setdefault(name, torch.zeros(s.param.shape, dtype=torch.bool, device=s.param.device))
        start = s.offset + head * s.size
        mask.narrow(s.axis, start, s.size).fill_(True)
    if not masks:
        raise ValueError(f"{label}: every attention parameter is frozen (requires_grad=False)")
    return masks
