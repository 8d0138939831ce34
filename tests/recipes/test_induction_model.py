"""The induction recipe's attention-only transformer and its data: shapes, causality, losses, vmap over
stacked parameters, an LLC estimate on the vmap path, deterministic data, and the 16 head observables."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.utils.data import DataLoader

import lightning_patterning as lp
from lightning_patterning.attention import head_restrictions
from recipes.induction import InductionLM, WindowDataset, byte_windows, repeated_halves, stdlib_text
from recipes.induction.data import stdlib_files


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """A tiny model: intra-op threads only add synchronization. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lm() -> InductionLM:
    torch.manual_seed(0)
    return InductionLM()


def test_default_size_and_shapes(lm: InductionLM) -> None:
    # 256·64 + 32·64 (embeddings) + 2·(4·(64·64 + 64) + 128) (blocks) + 128 + 64·256 + 256 (unembed)
    assert sum(p.numel() for p in lm.parameters()) == 68_736
    tokens = torch.randint(256, (3, 32))
    assert lm(tokens).shape == (3, 32, 256)
    assert lm.per_token_loss(tokens).shape == (3, 31)
    assert lm.per_sample_loss(tokens).shape == (3,)
    assert lm.per_sample_loss([tokens]).shape == (3,)
    torch.testing.assert_close(lm.per_sample_loss((tokens,)), lm.per_token_loss(tokens).mean(1))
    assert lm.model.attention_patterns(tokens).shape == (2, 3, 8, 32, 32)
    # an untrained model predicts roughly uniformly over the 256 bytes
    assert abs(lm.per_sample_loss(tokens).mean().item() - math.log(256)) < 0.5
    with pytest.raises(ValueError, match="context"):
        lm(torch.randint(256, (1, 33)))
    with pytest.raises(TypeError, match="token tensor"):
        lm.per_sample_loss(torch.randn(2, 8))


def test_causal(lm: InductionLM) -> None:
    tokens = torch.randint(256, (2, 32))
    changed = tokens.clone()
    t = 17
    changed[:, t] = (tokens[:, t] + 1) % 256
    with torch.no_grad():
        before, after = lm(tokens), lm(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=0)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=(0, 2)).min() > 0
    patterns = lm.model.attention_patterns(tokens)
    assert torch.all(patterns.triu(diagonal=1) == 0)
    torch.testing.assert_close(patterns.sum(-1), torch.ones(patterns.shape[:-1]))


def test_forward_under_vmap_over_stacked_parameters(lm: InductionLM) -> None:
    copies = [InductionLM() for _ in range(3)]
    params, buffers = stack_module_state(copies)
    tokens = torch.randint(256, (4, 32))

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(lm, (p, b), args=(tokens,), kwargs=None, strict=False).logsumexp(-1).sum()

    values = vmap(loss)(params, buffers)
    grads = vmap(torch.func.grad(loss))(params, buffers)
    for i, copy in enumerate(copies):
        torch.testing.assert_close(values[i], copy(tokens).logsumexp(-1).sum(), rtol=1e-5, atol=1e-3)
    assert grads["model.blocks.1.attn.q_proj.weight"].shape == (3, 64, 64)
    per_sample = vmap(lambda p: functional_call(lm, p, (tokens,), strict=False))
    assert per_sample(params).shape == (3, 4, 32, 256)


def test_estimate_llc_runs_on_the_vmap_path(lm: InductionLM) -> None:
    config = lp.SGLDConfig(num_chains=2, num_draws=5, batch_size=8, lr=1e-4, nbeta=30, localization=300)
    result = lp.estimate_llc(lm, lambda m, b: m.per_sample_loss(b), WindowDataset(64, seed=1), config)
    assert result.mode == "vmap"
    assert math.isfinite(result.mean) and result.diverged_chains == 0
    restricted = lp.estimate_llc(
        lm,
        lambda m, b: m.per_sample_loss(b),
        WindowDataset(64, seed=1),
        config,
        head_restrictions(lm)[9].masks,
    )
    assert restricted.mode == "vmap" and math.isfinite(restricted.mean)


def test_sixteen_head_observables(lm: InductionLM) -> None:
    observables = head_restrictions(lm)
    assert [o.name for o in observables] == [f"l{layer}h{head}" for layer in range(2) for head in range(8)]
    masks = observables[11].masks  # layer 1, head 3: rows / columns 24:32
    assert set(masks) == {f"model.blocks.1.attn.{p}_proj.weight" for p in "qkvo"} | {
        f"model.blocks.1.attn.{p}_proj.bias" for p in "qkv"
    }
    q = masks["model.blocks.1.attn.q_proj.weight"]
    assert q[24:32].all() and q.sum() == 8 * 64
    o = masks["model.blocks.1.attn.o_proj.weight"]
    assert o[:, 24:32].all() and o.sum() == 64 * 8


def test_data_is_deterministic_and_real_text() -> None:
    assert stdlib_files() and not any("site-packages" in f or "/test/" in f for f in stdlib_files())
    text = stdlib_text(10_000, seed=3)
    assert len(text) == 10_000 and text == stdlib_text(10_000, seed=3)
    assert b"def " in stdlib_text(200_000, seed=3)
    first = byte_windows(16, 32, seed=5, max_bytes=200_000)
    assert first.dtype == torch.long and first.shape == (16, 32) and int(first.max()) < 256
    assert torch.equal(first, byte_windows(16, 32, seed=5, max_bytes=200_000))
    assert not torch.equal(first, byte_windows(16, 32, seed=6, max_bytes=200_000))
    dataset = WindowDataset(20, context=16, seed=2, max_bytes=200_000)
    assert len(dataset) == 20 and dataset[3].shape == (16,)
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert batch.shape == (8, 16) and batch.dtype == torch.long


def test_repeated_halves() -> None:
    even = repeated_halves(5, 32, seed=0)
    assert even.shape == (5, 32) and torch.equal(even[:, :16], even[:, 16:])
    assert torch.equal(even, repeated_halves(5, 32, seed=0))
    odd = repeated_halves(4, 9, seed=1, vocab=10)
    assert odd.shape == (4, 9) and torch.equal(odd[:, 1:5], odd[:, 5:]) and int(odd.max()) < 10
