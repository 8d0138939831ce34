"""estimate_llc against ground truths: the analytic LLC of linear regression, agreement of the two chain
paths, isolation of the live model, divergence handling, input checks, and the paired estimator."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_patterning as lp
from tests.conftest import Regression


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These models are tiny: intra-op threads only add synchronization, which costs 3-10× on a busy
    2-core machine. The previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llc_config(**overrides: object) -> lp.SGLDConfig:
    """The sampler used for the regression tests: nβ = m / log m (batch 32), no localization.

    At lr 5e-3 the step is εa ≈ 0.09 with a = 2·nβ the curvature of nβ·L along each direction, so the
    discretization bias is ≈ +εa/4 ≈ 2.3% plus ≈ 1% from minibatch gradient noise, and chains relax in
    ≈ 2/(εa) ≈ 22 steps (200 burn-in steps are ≈ 9 relaxation times).
    """
    settings: dict[str, object] = dict(
        lr=5e-3,
        nbeta=None,
        localization=0.0,
        num_chains=4,
        num_burnin_steps=200,
        num_draws=2000,
        batch_size=32,
        seed=0,
    )
    settings.update(overrides)
    return lp.SGLDConfig(**settings)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- 1. analytic LLC


# Sampled parameters and chains. The loss is an exact quadratic, so at the least-squares solution
# E[nβ·(L(w) − L(w*))] = (sampled parameters) / 2 for any nβ. Per chain the estimate fluctuates like
# (χ²_k / 2) averaged over ≈ draws / 22 effective samples, a relative standard error of
# ≈ √(2/k · 22 / (draws · chains)): 16 chains give ≈ 1.6% for k = 10, 11 and 64 chains ≈ 2.6% for the
# bias alone (k = 1), against 10% − 3.5% bias of slack, ≥ 3 standard errors.
@pytest.mark.parametrize(
    ("restrict", "truth", "chains"),
    [(None, 5.5, 16), ("weight", 5.0, 16), ("bias", 0.5, 64)],
    ids=["all", "weight", "bias"],
)
def test_llc_matches_analytic_value_of_linear_regression(
    regression: Regression, loss_fn, restrict: str | None, truth: float, chains: int
) -> None:
    result = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(num_chains=chains), restrict=restrict
    )
    print(f"\nLLC[{restrict or 'all'}] = {result.mean:.3f} ± {result.stderr:.3f} (truth {truth})")
    assert result.mode == "vmap"
    assert result.diverged_chains == 0
    assert result.per_chain.shape == (chains,)
    assert result.trace.shape == (chains, 2000)
    assert result.mean == pytest.approx(truth, rel=0.10)
    assert result.stderr < 0.035 * truth  # the tolerance above is ≥ 3 standard errors


def test_llc_restricted_by_entry_mask(regression: Regression, loss_fn) -> None:
    """A per-entry mask on 3 of the 10 weights: λ = 3/2 (5 if the masked-out entries moved too)."""
    model = regression.model()
    mask = torch.zeros(1, 10)
    mask[0, [1, 4, 7]] = 1.0
    config = llc_config(num_chains=64, num_draws=1000)
    result = lp.estimate_llc(model, loss_fn, regression.dataset, config, restrict={"weight": mask})
    print(f"\nLLC[3 weight entries] = {result.mean:.3f} ± {result.stderr:.3f} (truth 1.5)")
    assert result.mean == pytest.approx(1.5, rel=0.10)


# --------------------------------------------------------------------------- 2. vmap and sequential


def test_vmap_and_sequential_agree_within_monte_carlo_error(regression: Regression, loss_fn) -> None:
    config = dict(num_chains=4, num_burnin_steps=100, num_draws=500)
    vmapped = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(chain_mode="vmap", **config)
    )
    sequential = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(chain_mode="sequential", **config)
    )
    print(
        f"\nvmap {vmapped.mean:.3f} ± {vmapped.stderr:.3f}, "
        f"sequential {sequential.mean:.3f} ± {sequential.stderr:.3f}"
    )
    assert (vmapped.mode, sequential.mode) == ("vmap", "sequential")
    combined = math.hypot(vmapped.stderr, sequential.stderr)
    assert abs(vmapped.mean - sequential.mean) < 3 * combined
    # Minibatch streams are seeded per chain, whatever the path: the checkpoint's losses on them agree.
    assert vmapped.center_trace is not None and sequential.center_trace is not None
    torch.testing.assert_close(vmapped.center_trace, sequential.center_trace)
    # ... but the noise is drawn differently, so the chains themselves differ.
    assert not torch.equal(vmapped.trace, sequential.trace)


@pytest.mark.parametrize("chain_mode", ["vmap", "sequential"])
def test_shared_batches_give_every_chain_the_same_minibatch(
    regression: Regression, loss_fn, chain_mode: str
) -> None:
    """``shared_batches=True`` (devinterp's default sampling): one minibatch stream for all chains, so the
    paired centre losses agree across chains and across paths; the noise still differs per chain, and the
    estimate is still the analytic 5.5 (within 10 %, as for independent streams)."""
    config = llc_config(chain_mode=chain_mode, shared_batches=True, num_chains=16)
    result = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)
    print(f"\nshared batches ({chain_mode}): LLC {result.mean:.3f} ± {result.stderr:.3f}")
    assert result.mode == chain_mode
    center = result.center_trace
    assert center is not None
    assert torch.equal(center, center[:1].expand_as(center))
    assert all(not torch.equal(result.trace[0], result.trace[c]) for c in range(1, 16))
    assert result.mean == pytest.approx(5.5, rel=0.10)
    other_path = "sequential" if chain_mode == "vmap" else "vmap"
    few = dict(shared_batches=True, num_chains=3, num_burnin_steps=0, num_draws=20)
    here = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(chain_mode=chain_mode, **few)
    )
    there = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(chain_mode=other_path, **few)
    )
    assert here.center_trace is not None and there.center_trace is not None
    torch.testing.assert_close(here.center_trace, there.center_trace)


@pytest.mark.parametrize("chain_mode", ["vmap", "sequential"])
def test_each_path_is_bitwise_reproducible(regression: Regression, loss_fn, chain_mode: str) -> None:
    def run(seed: int) -> lp.LLCResult:
        config = llc_config(chain_mode=chain_mode, num_chains=3, num_burnin_steps=10, num_draws=50, seed=seed)
        return lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)

    first, second, other = run(0), run(0), run(1)
    assert first.mode == chain_mode
    assert torch.equal(first.per_chain, second.per_chain)
    assert torch.equal(first.trace, second.trace)
    assert first.mean == second.mean
    assert not torch.equal(first.trace, other.trace)
    assert not torch.equal(first.per_chain, other.per_chain)


def test_chains_differ_from_each_other(regression: Regression, loss_fn) -> None:
    result = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(num_burnin_steps=0, num_draws=20)
    )
    rows = result.trace
    assert all(not torch.equal(rows[i], rows[j]) for i in range(4) for j in range(i + 1, 4))


def test_auto_mode_picks_vmap_for_linear(regression: Regression, loss_fn) -> None:
    config = llc_config(chain_mode="auto", num_burnin_steps=0, num_draws=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)
    assert result.mode == "vmap"


def test_auto_mode_runs_compute_bound_chains_sequentially_on_cpu(regression: Regression, loss_fn) -> None:
    """``auto_sequential_flops``: a chain forward at or above it (FLOPs counted on the validation
    minibatch) runs the sequential path, with the same streams as ``chain_mode="sequential"``."""
    few = dict(num_burnin_steps=0, num_draws=10)
    forward_flops = 2 * 32 * 10  # a batch of 32 through Linear(10, 1): one addmm, 2·B·d FLOPs
    at_threshold = llc_config(auto_sequential_flops=float(forward_flops), **few)
    above_threshold = llc_config(auto_sequential_flops=float(forward_flops + 1), **few)
    forced = llc_config(chain_mode="sequential", **few)
    runs = [
        lp.estimate_llc(regression.model(), loss_fn, regression.dataset, c)
        for c in (at_threshold, above_threshold, forced)
    ]
    assert [r.mode for r in runs] == ["sequential", "vmap", "sequential"]
    assert torch.equal(runs[0].trace, runs[2].trace)
    assert (
        lp.estimate_llc(
            regression.model(), loss_fn, regression.dataset, llc_config(auto_sequential_flops=None, **few)
        ).mode
        == "vmap"
    )


class _ItemCalling(nn.Module):
    """A linear model whose forward reads a Python number from an intermediate (not vmappable)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        scale = 1.0 + 0.0 * out.detach().abs().max().item()
        return out * scale


class _Branching(nn.Module):
    """A linear model with data-dependent Python control flow (not vmappable)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if out.sum() > -1e30:
            return out
        return -out


@pytest.mark.parametrize("wrapper", [_ItemCalling, _Branching])
def test_auto_mode_falls_back_to_sequential(regression: Regression, loss_fn, wrapper: type) -> None:
    model = wrapper(regression.model())
    config = llc_config(chain_mode="auto", num_burnin_steps=20, num_draws=100)
    with pytest.warns(RuntimeWarning, match="sequential"):
        result = lp.estimate_llc(model, loss_fn, regression.dataset, config)
    print(f"\n{wrapper.__name__}: LLC {result.mean:.3f} ± {result.stderr:.3f} ({result.mode})")
    assert result.mode == "sequential"
    assert result.diverged_chains == 0
    assert math.isfinite(result.mean) and math.isfinite(result.stderr)
    assert bool(torch.isfinite(result.per_chain).all())
    assert 0 < result.mean < 20  # a loose sanity bound around the truth 5.5


# --------------------------------------------------------------------------- 3. isolation


def _mixed_mode_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(10, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 1),
    )
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    model.train()
    model[2].eval()  # flags must be restored per submodule, not by a blanket .train()/.eval()
    return model


@pytest.mark.parametrize(("chain_mode", "paired"), [("vmap", True), ("sequential", False)])
def test_live_model_and_global_rng_are_untouched(
    regression: Regression, loss_fn, chain_mode: str, paired: bool
) -> None:
    model = _mixed_mode_model()
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    flags_before = [(name, m.training) for name, m in model.named_modules()]
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    rng_before = torch.get_rng_state()
    np_before = np.random.get_state()
    py_before = random.getstate()

    config = llc_config(
        chain_mode=chain_mode,
        paired=paired,
        num_chains=2,
        num_burnin_steps=5,
        num_draws=20,
        init_loss_batches=4,
    )
    result = lp.estimate_llc(model, loss_fn, DataLoader(regression.dataset, batch_size=8), config)

    assert result.mode == chain_mode
    assert math.isfinite(result.mean)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert np.random.get_state()[1].tolist() == np_before[1].tolist()
    assert random.getstate() == py_before
    for name, p in model.named_parameters():
        assert torch.equal(p, params_before[name]), name
        assert p.grad is None, name
        assert p.requires_grad, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers_before[name]), name
    assert [(name, m.training) for name, m in model.named_modules()] == flags_before


def test_existing_gradients_are_left_alone(regression: Regression, loss_fn) -> None:
    """Mid-training the live model may hold gradients: they must come back bitwise unchanged."""
    model = regression.model()
    loss_fn(model, regression.dataset[:64]).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2
    for chain_mode in ("vmap", "sequential"):
        config = llc_config(chain_mode=chain_mode, num_burnin_steps=0, num_draws=10)
        lp.estimate_llc(model, loss_fn, regression.dataset, config)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.equal(p.grad, grads[name]), (chain_mode, name)


def test_frozen_parameters_are_not_sampled(regression: Regression, loss_fn) -> None:
    """A parameter with requires_grad=False stays at w*: only the bias moves, so the LLC is ≈ 0.5."""
    model = regression.model()
    model.weight.requires_grad_(False)
    result = lp.estimate_llc(model, loss_fn, regression.dataset, llc_config(num_chains=16, num_draws=500))
    assert result.mean == pytest.approx(0.5, abs=0.15)
    assert not model.weight.requires_grad and model.bias.requires_grad


# --------------------------------------------------------------------------- 4. divergence


def test_huge_step_size_diverges_every_chain_without_raising(regression: Regression, loss_fn) -> None:
    config = llc_config(lr=10.0, num_burnin_steps=0, num_draws=20)
    result = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)
    assert result.diverged_chains == config.num_chains
    assert bool(result.diverged.all())
    assert math.isnan(result.mean)
    assert bool(torch.isnan(result.per_chain).all())


def test_divergence_flags_exactly_the_chains_past_the_threshold(regression: Regression, loss_fn) -> None:
    """A chain is diverged when its minibatch loss exceeds divergence_factor × max(L(w*), floor).

    L(w*) ≈ 0.09 < floor = 0.2, so the threshold is 3 × 0.2 = 0.6, while the stationary loss is
    ≈ L(w*) + 5.5 / nβ ≈ 0.7: within 10 steps from w* only some chains get past it. With no burn-in
    and no thinning every step is a draw, so the trace shows every loss the check saw.
    """
    config = llc_config(
        num_chains=16, num_burnin_steps=0, num_draws=10, divergence_factor=3.0, divergence_floor=0.2
    )
    result = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)
    print(f"\n{result.diverged_chains} of 16 chains past the threshold")
    assert 0 < result.diverged_chains < 16
    past = (~torch.isfinite(result.trace) | (result.trace > 0.6)).any(dim=1)
    assert torch.equal(result.diverged, past)
    assert torch.equal(torch.isnan(result.per_chain), result.diverged)
    kept = ~result.diverged
    assert result.center_trace is not None
    expected = result.nbeta * (result.trace[kept].double() - result.center_trace[kept].double()).mean(dim=1)
    torch.testing.assert_close(result.per_chain[kept].double(), expected, rtol=1e-5, atol=1e-5)
    assert result.mean == pytest.approx(float(expected.mean()), rel=1e-5)
    assert result.std == pytest.approx(float(expected.std()), rel=1e-5)
    assert result.stderr == pytest.approx(float(expected.std()) / math.sqrt(int(kept.sum())), rel=1e-5)


def test_healthy_run_has_no_nan(regression: Regression, loss_fn) -> None:
    result = lp.estimate_llc(
        regression.model(), loss_fn, regression.dataset, llc_config(num_burnin_steps=0, num_draws=50)
    )
    assert result.diverged_chains == 0
    assert torch.equal(torch.isnan(result.per_chain), result.diverged)
    assert bool(torch.isfinite(result.trace).all())


# --------------------------------------------------------------------------- 5. bad input


def test_restrict_pattern_matching_nothing_is_rejected(regression: Regression, loss_fn) -> None:
    with pytest.raises(ValueError, match=r"restrict.*nope\*"):
        lp.estimate_llc(regression.model(), loss_fn, regression.dataset, llc_config(), restrict="nope*")
    with pytest.raises(ValueError, match=r"restrict.*nope\*"):
        lp.estimate_llc(
            regression.model(), loss_fn, regression.dataset, llc_config(), restrict=["bias", "nope*"]
        )


@pytest.mark.parametrize(
    "bad_loss",
    [
        lambda m, b: (m(b[0]) - b[1].unsqueeze(-1)).square().unsqueeze(-1),  # [B, 1, 1]
        lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square().mean(),  # scalar
        lambda m, b: (m(b[0]).squeeze(-1) - b[1]).square()[:-1],  # [B - 1]
    ],
    ids=["B_by_1_by_1", "scalar", "short"],
)
def test_loss_fn_of_wrong_shape_is_rejected(regression: Regression, bad_loss) -> None:
    """Allowed: [B] per sample, [B, T] per position (tokens as samples); anything else is rejected."""
    with pytest.raises(ValueError, match=r"loss_fn.*shape \[batch\]"):
        lp.estimate_llc(regression.model(), bad_loss, regression.dataset, llc_config(num_draws=5))


def test_config_must_be_sgld_config(regression: Regression, loss_fn) -> None:
    with pytest.raises(TypeError, match="SGLDConfig"):
        lp.estimate_llc(regression.model(), loss_fn, regression.dataset, {"lr": 1e-3})  # type: ignore[arg-type]


class _Stream(IterableDataset):
    def __init__(self, regression: Regression) -> None:
        self.regression = regression

    def __iter__(self):
        return iter(zip(self.regression.x, self.regression.y, strict=True))


def test_iterable_dataset_is_rejected(regression: Regression, loss_fn) -> None:
    stream = _Stream(regression)
    with pytest.raises(TypeError, match="IterableDataset"):
        lp.estimate_llc(regression.model(), loss_fn, stream, llc_config())
    with pytest.raises(TypeError, match="IterableDataset"):
        lp.estimate_llc(regression.model(), loss_fn, DataLoader(stream, batch_size=4), llc_config())


def test_dataloader_and_dataset_give_the_same_result(regression: Regression, loss_fn) -> None:
    """Chains draw their own minibatches: the DataLoader's own batch size and order are irrelevant."""
    config = llc_config(num_burnin_steps=0, num_draws=20)
    from_dataset = lp.estimate_llc(regression.model(), loss_fn, regression.dataset, config)
    loader = DataLoader(regression.dataset, batch_size=7, shuffle=True)
    from_loader = lp.estimate_llc(regression.model(), loss_fn, loader, config)
    assert torch.equal(from_dataset.trace, from_loader.trace)


# --------------------------------------------------------------------------- 6. paired estimator


def test_paired_estimator_has_lower_variance_than_unpaired(regression_factory, loss_fn) -> None:
    """With noise std 2 the per-sample loss at w* has variance 2σ⁴ = 32, so nβ = 100 turns the
    minibatch noise of L(w*) into an error of ≈ nβ·√(32 / (32 · 32)) ≈ 18 in the unpaired estimate;
    pairing each draw with w* on the same minibatch cancels it. Both estimate the same quantity (the
    chains are identical, only the estimator differs)."""
    noisy = regression_factory(noise=2.0, seed=1)
    means: dict[bool, list[float]] = {True: [], False: []}
    stderrs: dict[bool, list[float]] = {True: [], False: []}
    for seed in range(6):
        for paired in (True, False):
            config = lp.SGLDConfig(
                lr=5e-4,
                nbeta=100.0,
                localization=0.0,
                num_chains=4,
                num_burnin_steps=50,
                num_draws=300,
                batch_size=32,
                paired=paired,
                seed=seed,
            )
            result = lp.estimate_llc(noisy.model(), loss_fn, noisy.dataset, config)
            assert result.diverged_chains == 0
            means[paired].append(result.mean)
            stderrs[paired].append(result.stderr)
    paired_means, unpaired_means = torch.tensor(means[True]), torch.tensor(means[False])
    spread = {True: float(paired_means.std()), False: float(unpaired_means.std())}
    mean_stderr = {p: sum(s) / len(s) for p, s in stderrs.items()}
    print(
        f"\npaired:   means {[round(m, 2) for m in means[True]]}, spread {spread[True]:.3f}, "
        f"mean stderr {mean_stderr[True]:.3f}"
        f"\nunpaired: means {[round(m, 2) for m in means[False]]}, spread {spread[False]:.3f}, "
        f"mean stderr {mean_stderr[False]:.3f}"
    )
    assert spread[True] < spread[False]
    assert mean_stderr[True] < mean_stderr[False]
    # Same expectation: the averages over seeds agree within the unpaired estimator's error.
    difference = float((unpaired_means - paired_means).mean())
    assert abs(difference) < 3 * float((unpaired_means - paired_means).std()) / math.sqrt(6)
    # The reported stderr describes the actual spread across seeds, loosely: 6 seeds, and the unpaired
    # stderr is conservative by ≈ 1/√(1 − 1024/2000) since its 32 reference batches of 32 are drawn
    # without replacement from the 2000 samples.
    for paired in (True, False):
        assert 0.2 < spread[paired] / mean_stderr[paired] < 3, paired


def test_batch_size_larger_than_the_data_warns_and_takes_the_whole_set(
    regression: Regression, loss_fn
) -> None:
    """A minibatch larger than the dataset would repeat samples within one step: every minibatch is the
    whole set instead (20 samples here), with a warning that says so."""
    small = torch.utils.data.TensorDataset(*(t[:20] for t in regression.dataset.tensors))
    sizes: set[int] = set()

    def recording_loss(module: nn.Module, batch):
        sizes.add(int(batch[0].shape[-2]))
        return loss_fn(module, batch)

    config = llc_config(batch_size=64, num_draws=5, num_chains=2, chain_mode="sequential", paired=False)
    with pytest.warns(UserWarning, match=r"batch_size = 64 exceeds the 20 samples .* the whole set"):
        result = lp.estimate_llc(regression.model(), recording_loss, small, config)
    assert sizes == {20}
    assert math.isfinite(result.mean) and result.diverged_chains == 0
