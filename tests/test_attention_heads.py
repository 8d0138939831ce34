"""head_restrictions: per-head masks for the common attention layouts.

For each layout the masks of a layer's heads are disjoint and cover exactly the q/k/v/o weights and the
q/k/v biases, and moving the weights inside head h's mask changes the layer's output only through head h:
the other heads' outputs (the input of the output projection, split the standard ``view(B, T, H, d_h)``
way, or computed by hand for ``nn.MultiheadAttention``) are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_patterning.attention import head_restrictions
from lightning_patterning.sgld.restrict import resolve_param_masks

D, H = 12, 3
DH = D // H


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: ``y = x @ W + b`` with ``W`` of shape ``[in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal attention with the standard head split; returns heads concatenated ``[B, T, H·d_v]``."""
    b, t, _ = q.shape
    q, k, v = (a.view(b, t, heads, -1).transpose(1, 2) for a in (q, k, v))
    scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf")
    )
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)


class Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = H
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.o_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads))


class Fused(nn.Module):
    """nanoGPT's layout (``c_attn`` Linear ``d → 3d`` with rows q | k | v); GPT-2's when ``conv1d``."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        self.n_head = H
        self.c_attn = Conv1D(3 * D, D) if conv1d else nn.Linear(D, 3 * D)
        self.c_proj = Conv1D(D, D) if conv1d else nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(attend(*self.c_attn(x).split(D, dim=-1), heads=self.n_head))


class Model(nn.Module):
    """Two attention layers between other parameters that belong to no head."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(D, D)
        self.layers = nn.ModuleList([make(), make()])
        self.head = nn.Linear(D, 2)


def lens_attention() -> nn.Module:
    """TransformerLens's parameter layout."""
    module = nn.Module()
    for name, shape in [("W_Q", (H, D, DH)), ("W_K", (H, D, DH)), ("W_V", (H, D, DH)), ("W_O", (H, DH, D))]:
        module.register_parameter(name, nn.Parameter(torch.randn(shape)))
    for name, shape in [("b_Q", (H, DH)), ("b_K", (H, DH)), ("b_V", (H, DH)), ("b_O", (D,))]:
        module.register_parameter(name, nn.Parameter(torch.randn(shape)))
    return module


LAYOUTS: dict[str, tuple[Callable[[], nn.Module], list[str], str]] = {
    # layout: (factory, parameters the heads own, parameter they must not own)
    "separate": (
        Separate,
        [f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + ["o_proj.weight"],
        "o_proj.bias",
    ),
    "fused": (Fused, ["c_attn.weight", "c_attn.bias", "c_proj.weight"], "c_proj.bias"),
    "conv1d": (lambda: Fused(conv1d=True), ["c_attn.weight", "c_attn.bias", "c_proj.weight"], "c_proj.bias"),
    "mha": (
        lambda: nn.MultiheadAttention(D, H, batch_first=True),
        ["in_proj_weight", "in_proj_bias", "out_proj.weight"],
        "out_proj.bias",
    ),
    "mha_kdim": (
        lambda: nn.MultiheadAttention(D, H, kdim=5, vdim=7, add_bias_kv=True),
        [
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "in_proj_bias",
            "bias_k",
            "bias_v",
            "out_proj.weight",
        ],
        "out_proj.bias",
    ),
    "lens": (lens_attention, ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"], "b_O"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_masks_partition_the_attention_weights(layout: str) -> None:
    make, owned, shared = LAYOUTS[layout]
    model = Model(make)
    observables = head_restrictions(model)
    assert [o.name for o in observables] == [f"l{layer}h{head}" for layer in range(2) for head in range(H)]
    params = dict(model.named_parameters())
    for layer in range(2):
        heads = observables[layer * H : (layer + 1) * H]
        expected = {f"layers.{layer}.{name}" for name in owned}
        for head in heads:
            assert set(head.masks) == expected  # every head owns a slice of each, and nothing else
            assert all(m.any() for m in head.masks.values())
            resolve_param_masks(model, head.masks)  # accepted by the chains
        for name in expected:
            coverage = sum(head.masks[name].long() for head in heads)
            assert torch.equal(coverage, torch.ones_like(params[name], dtype=torch.long)), name
        assert all(f"layers.{layer}.{shared}" not in head.masks for head in heads)


def perturb(model: nn.Module, masks: dict[str, torch.Tensor], seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].add_(torch.randn(mask.shape, generator=generator).to(params[name]) * mask)


@pytest.mark.parametrize("layout", ["separate", "fused", "conv1d"])
@pytest.mark.parametrize("head", range(H))
def test_perturbing_a_head_changes_only_that_head(layout: str, head: int) -> None:
    torch.manual_seed(0)
    model = Model(LAYOUTS[layout][0])
    attention = model.layers[1]
    out_proj = attention.o_proj if layout == "separate" else attention.c_proj
    seen: list[torch.Tensor] = []
    out_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].view(2, 5, H, DH)))
    w_o = out_proj.weight if isinstance(out_proj, nn.Linear) else out_proj.weight.T  # [out, in]
    x = torch.randn(2, 5, D)
    before, w_before = attention(x), w_o.detach().clone()
    perturb(model, head_restrictions(model)[H + head].masks)
    after = attention(x)
    z, z_new = seen
    others = [g for g in range(H) if g != head]
    torch.testing.assert_close(z_new[:, :, others], z[:, :, others], rtol=0, atol=1e-6)
    assert (z_new[:, :, head] - z[:, :, head]).abs().max() > 1e-2
    cols = slice(head * DH, (head + 1) * DH)
    through_head = z_new[:, :, head] @ w_o[:, cols].T - z[:, :, head] @ w_before[:, cols].T
    torch.testing.assert_close(after - before, through_head, rtol=1e-5, atol=1e-5)


def mha_heads(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head contributions ``[H, B, T, d]`` to ``mha(x, x, x)`` (without the output bias), by hand."""
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    contributions = []
    for h in range(mha.num_heads):
        rows = slice(h * DH, (h + 1) * DH)
        q, k, v = (x @ w[rows].T + b[rows] for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
        pattern = (q @ k.transpose(-2, -1) / math.sqrt(DH)).softmax(-1)
        contributions.append(pattern @ v @ mha.out_proj.weight[:, rows].T)
    return torch.stack(contributions)


@pytest.mark.parametrize("head", range(H))
def test_perturbing_an_mha_head_changes_only_that_head(head: int) -> None:
    torch.manual_seed(0)
    model = Model(LAYOUTS["mha"][0]).double()
    mha = model.layers[0]
    x = torch.randn(2, 5, D, dtype=torch.float64)

    def output() -> torch.Tensor:
        return mha(x, x, x, need_weights=False)[0]

    with torch.no_grad():
        before, parts = output(), mha_heads(mha, x)
        torch.testing.assert_close(parts.sum(0) + mha.out_proj.bias, before)  # the decomposition is right
        perturb(model, head_restrictions(model)[head].masks)
        after, new_parts = output(), mha_heads(mha, x)
    torch.testing.assert_close(new_parts.sum(0) + mha.out_proj.bias, after)
    others = [g for g in range(H) if g != head]
    torch.testing.assert_close(new_parts[others], parts[others], rtol=0, atol=1e-6)
    assert (new_parts[head] - parts[head]).abs().max() > 1e-2


def test_explicit_layers_and_num_heads() -> None:
    model = Model(Separate)
    for attention in model.layers:
        del attention.num_heads
    with pytest.raises(ValueError, match="num_heads="):
        head_restrictions(model)
    by_name = head_restrictions(model, layers=["layers.1", "layers.0"], num_heads=2)
    by_module = head_restrictions(model, layers=[model.layers[1], model.layers[0]], num_heads=2)
    assert [o.name for o in by_name] == ["l0h0", "l0h1", "l1h0", "l1h1"]
    assert set(by_name[0].masks) == {n for n, _ in model.named_parameters() if n.startswith("layers.1.")} - {
        "layers.1.o_proj.bias"
    }
    for a, b in zip(by_name, by_module, strict=True):
        assert a.masks.keys() == b.masks.keys()
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert int(by_name[0].masks["layers.1.q_proj.weight"].sum()) == D // 2 * D


def test_frozen_parameters_are_left_out() -> None:
    model = Model(Separate)
    model.layers[0].q_proj.bias.requires_grad_(False)
    names = head_restrictions(model)[0].masks
    assert "layers.0.q_proj.bias" not in names and "layers.0.q_proj.weight" in names
    resolve_param_masks(model, names)


def test_errors() -> None:
    with pytest.raises(ValueError, match="no attention module found"):
        head_restrictions(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="not a recognised attention layout"):
        head_restrictions(Model(Separate), layers=["embed"], num_heads=2)
    with pytest.raises(ValueError, match="no submodule"):
        head_restrictions(Model(Separate), layers=["attn"])
    ambiguous = Separate()
    ambiguous.qkv = nn.Linear(D, 3 * D)
    with pytest.raises(ValueError, match="both a fused qkv"):
        head_restrictions(ambiguous)
    grouped = Separate()
    grouped.k_proj, grouped.v_proj = nn.Linear(D, DH), nn.Linear(D, DH)
    with pytest.raises(ValueError, match="grouped-query"):
        head_restrictions(grouped)
    headless = Separate()
    del headless.num_heads
    with pytest.raises(ValueError, match="not divisible"):
        head_restrictions(headless, num_heads=5)
    with pytest.raises(ValueError, match="the module says 3 heads"):
        head_restrictions(Separate(), num_heads=5)
    with pytest.raises(ValueError, match="num_heads=4 but"):
        head_restrictions(nn.MultiheadAttention(D, H), num_heads=4)
    with pytest.raises(ValueError, match="not parameters of the model"):
        head_restrictions(Model(Separate), layers=[Separate()])


def test_the_model_itself_may_be_the_attention_module() -> None:
    observables = head_restrictions(nn.MultiheadAttention(D, H))
    assert [o.name for o in observables] == ["l0h0", "l0h1", "l0h2"]
    assert set(observables[0].masks) == {"in_proj_weight", "in_proj_bias", "out_proj.weight"}
