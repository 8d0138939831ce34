"""The package on a CUDA device: the chain engine in both modes, the sampler given CUDA tensors, and the
callbacks in a ``Trainer(accelerator="cuda")``. Skipped where no CUDA device is present.

What must live where: the model, its parameters, the chains' stacked copies, masks and the SGLD noise
generators (``private_generator(..., device=model device)``) are on the model's device; minibatch indices
come from CPU generators (so every chain's minibatches are the same on any device and in either chain
mode) and batches are moved to the model's device; results, running sums and sampler weights are on the
CPU. CUDA's generator is not CPU's (Philox, not Mersenne twister), so a CUDA run draws other noise than a
CPU run with the same seed, and the vmap path draws one noise stream for all chains where the sequential
path draws one per chain: estimates agree across devices and modes within Monte-Carlo error, the
checkpoint's losses on the chains' minibatches (the paired centre trace) to float tolerance.

Ground truth: linear regression at its least-squares solution, whose LLC is (number of sampled
parameters)/2 (docs/concepts/llc.md; tests/conftest.py).

Run them on a GPU machine with ``python -m benchmarks.gpu_check --device cuda`` or
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_patterning as lp
from lightning_patterning.observables import LLC, Custom, ProbeLoss, Restricted
from tests.conftest import Regression, make_regression, squared_error
from tests.lightning_models import RegressionModule
from tests.patterning_problem import (
    SIZES,
    LinearRegressor,
    MixtureData,
    patterning_callback,
    probe_loss,
    sources,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = torch.device("cuda")
TRUTH = 5.5  # LLC of the 10 weights + bias of the regression at its least-squares solution
# Losses at w* on the same minibatches, computed by other kernels (batched or not, GPU or CPU): equal up to
# float32 rounding (~1e-6), compared at 1e-3; on different minibatches they differ by tens of percent.
SAME_BATCHES = dict(rtol=1e-3, atol=1e-5)


def llc_config(**overrides: object) -> lp.SGLDConfig:
    """The regression sampler of tests/test_llc_estimator.py: nβ = m / log m (batch 32), no localization,
    lr 5e-3 (SGLD bias ≈ +3.3 %, relaxation ≈ 22 steps)."""
    settings: dict[str, object] = dict(
        lr=5e-3, nbeta=None, localization=0.0, num_chains=8, num_burnin_steps=100, num_draws=1000,
        batch_size=32, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return lp.SGLDConfig(**settings)  # type: ignore[arg-type]


def _on_cuda(model: nn.Module) -> nn.Module:
    return model.to(DEVICE)


def _rng_states() -> tuple[torch.Tensor, torch.Tensor, list[int], object]:
    return (
        torch.get_rng_state(),
        torch.cuda.get_rng_state(),
        np.random.get_state()[1].tolist(),
        random.getstate(),
    )


# --------------------------------------------------------------------------- chain engine: LLC


def test_llc_on_cuda_matches_the_analytic_value(regression: Regression) -> None:
    """16 chains × 2000 draws (vmap): relative standard error ≈ 1.6 %, so 10 % is ≥ 4 errors past the
    SGLD bias."""
    config = llc_config(num_chains=16, num_burnin_steps=200, num_draws=2000, chain_mode="vmap")
    result = lp.estimate_llc(_on_cuda(regression.model()), squared_error, regression.dataset, config)
    print(f"\nLLC on cuda = {result.mean:.3f} ± {result.stderr:.3f} (truth {TRUTH})")
    assert result.mode == "vmap"
    assert result.diverged_chains == 0
    assert result.mean == pytest.approx(TRUTH, rel=0.10)
    assert result.trace.device.type == "cpu" and result.per_chain.device.type == "cpu"


@pytest.fixture(scope="module")
def llc_by_mode() -> dict[str, lp.LLCResult]:
    """The same settings on cuda in both modes, and on the CPU (vmap)."""
    regression = make_regression()
    out = {}
    for mode in ("vmap", "sequential"):
        model = _on_cuda(regression.model())
        out[mode] = lp.estimate_llc(model, squared_error, regression.dataset, llc_config(chain_mode=mode))
    out["cpu"] = lp.estimate_llc(regression.model(), squared_error, regression.dataset, llc_config())
    return out


def test_llc_vmap_and_sequential_on_cuda_agree_within_monte_carlo_error(llc_by_mode) -> None:
    """8 chains × 1000 draws per mode. The chains' noise differs between the paths (one generator for the
    stacked chains, one per chain in sequence), so the estimates are compared by their standard errors
    (|Δ| < 5 combined errors: a t variable with ~14 degrees of freedom passes that with p ≈ 2e-4), and each
    against the truth (relative standard error ≈ 3 %, SGLD bias ≈ +3 %: 15 % is ≥ 3.5 errors)."""
    vmapped, sequential = llc_by_mode["vmap"], llc_by_mode["sequential"]
    print(
        f"\ncuda vmap {vmapped.mean:.3f} ± {vmapped.stderr:.3f}, "
        f"cuda sequential {sequential.mean:.3f} ± {sequential.stderr:.3f}"
    )
    assert (vmapped.mode, sequential.mode) == ("vmap", "sequential")
    for result in (vmapped, sequential):
        assert result.diverged_chains == 0
        assert bool(torch.isfinite(result.per_chain).all()) and math.isfinite(result.stderr)
        assert result.mean == pytest.approx(TRUTH, rel=0.15)
    assert abs(vmapped.mean - sequential.mean) < 5 * math.hypot(vmapped.stderr, sequential.stderr)
    # Minibatches come from per-chain CPU streams in either mode: the checkpoint's losses on them agree ...
    assert vmapped.center_trace is not None and sequential.center_trace is not None
    torch.testing.assert_close(vmapped.center_trace, sequential.center_trace, **SAME_BATCHES)
    # ... while the noise, and so the chains, differ.
    assert not torch.equal(vmapped.trace, sequential.trace)


def test_llc_on_cuda_and_on_cpu_see_the_same_minibatches_and_agree(llc_by_mode) -> None:
    cuda, cpu = llc_by_mode["vmap"], llc_by_mode["cpu"]
    print(f"\ncuda {cuda.mean:.3f} ± {cuda.stderr:.3f}, cpu {cpu.mean:.3f} ± {cpu.stderr:.3f}")
    assert cuda.center_trace is not None and cpu.center_trace is not None
    torch.testing.assert_close(cuda.center_trace, cpu.center_trace, **SAME_BATCHES)
    assert not torch.equal(cuda.trace, cpu.trace)  # CUDA's generator is not CPU's
    assert abs(cuda.mean - cpu.mean) < 5 * math.hypot(cuda.stderr, cpu.stderr)


def test_llc_on_cuda_is_reproducible_and_accepts_data_already_on_the_device(regression: Regression) -> None:
    """Same seed, same result bitwise; a TensorDataset held on the GPU gives the same batches as one on
    the CPU (the indices are drawn on the CPU either way)."""
    config = llc_config(num_chains=4, num_draws=200)
    on_gpu = TensorDataset(*(t.to(DEVICE) for t in regression.dataset.tensors))
    first = lp.estimate_llc(_on_cuda(regression.model()), squared_error, regression.dataset, config)
    second = lp.estimate_llc(_on_cuda(regression.model()), squared_error, on_gpu, config)
    assert torch.equal(first.trace, second.trace)
    assert first.center_trace is not None and torch.equal(first.center_trace, second.center_trace)


def _batchnorm_dropout_model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    model[3].eval()  # flags are restored per submodule
    return _on_cuda(model)


@pytest.mark.parametrize(("chain_mode", "paired"), [("vmap", True), ("sequential", False)])
def test_llc_on_cuda_leaves_the_live_model_and_every_rng_untouched(
    regression: Regression, chain_mode: str, paired: bool
) -> None:
    model = _batchnorm_dropout_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    flags = [(n, m.training) for n, m in model.named_modules()]
    torch.manual_seed(1234)
    before = _rng_states()
    config = llc_config(chain_mode=chain_mode, paired=paired, num_chains=3, num_burnin_steps=5, num_draws=20)
    result = lp.estimate_llc(model, squared_error, regression.dataset, config)

    assert result.mode == chain_mode
    assert math.isfinite(result.mean) and result.diverged_chains == 0
    after = _rng_states()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])  # CPU and CUDA generators
    assert after[2:] == before[2:]
    for name, p in model.named_parameters():
        assert p.device.type == "cuda" and torch.equal(p, params[name]) and p.grad is None, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert [(n, m.training) for n, m in model.named_modules()] == flags


# --------------------------------------------------------------------------- chain engine: susceptibilities


def _weight_norm(module: nn.Module) -> torch.Tensor:
    return module.weight.square().sum()


def _susceptibilities(model: nn.Module, regression: Regression, mode: str) -> lp.Susceptibilities:
    """8 chains × 200 draws, 5 steps apart; ``L`` on 8 batches of 32 = the whole training set (n = 256),
    so the LLC observable's posterior mean is the model's LLC, 11/2."""
    observables = [
        LLC(),
        ProbeLoss("held_out", make_regression(n=256, seed=1).dataset),
        Restricted("bias", params=["bias"]),
        Custom("weight_norm", _weight_norm),
    ]
    config = llc_config(num_draws=200, steps_between_draws=5, chain_mode=mode)
    return lp.estimate_susceptibilities(
        model, squared_error, regression.dataset, config, observables, regression.dataset,
        probe_indices=list(range(0, 256, 13)), loss_batches=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def chi_by_mode() -> dict[str, lp.Susceptibilities]:
    regression = make_regression(n=256)
    out = {
        mode: _susceptibilities(_on_cuda(regression.model()), regression, mode)
        for mode in ("vmap", "sequential")
    }
    out["cpu"] = _susceptibilities(regression.model(), regression, "vmap")
    return out


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_susceptibilities_on_cuda_are_finite_with_the_known_llc(chi_by_mode, mode: str) -> None:
    """μ of the LLC observable is ≈ 11/2 and the bias-restricted λ̂_C ≈ 1/2 (1000 SGLD steps of 8 chains:
    relative standard errors ≈ 4 % and ≈ 8 %, SGLD bias ≈ +3 %)."""
    chi = chi_by_mode[mode]
    mu = dict(zip(chi.names, chi.mu.tolist(), strict=True))
    print(f"\n{mode}: μ = {mu}")
    assert chi.matrix.shape == (4, 20) and chi.matrix.device.type == "cpu"
    assert bool(torch.isfinite(chi.matrix).all()) and bool(torch.isfinite(chi.stderr).all())
    assert chi.diverged_chains == {"full": 0, "bias": 0}
    assert mu["llc"] == pytest.approx(TRUTH, rel=0.15)
    assert mu["bias"] == pytest.approx(0.5, rel=0.3)


@pytest.mark.parametrize("other", ["sequential", "cpu"])
def test_susceptibilities_on_cuda_vmap_agree_with_other_paths_within_monte_carlo_error(
    chi_by_mode, other: str
) -> None:
    """Entry-wise ``z = Δχ / √(se₁² + se₂²)`` (jackknife errors over 8 chains) stays below 6, and the rows
    point the same way across the 20 probe samples (two independent estimates correlate at ≈ 0.9)."""
    a, b = chi_by_mode["vmap"], chi_by_mode[other]
    z = (a.matrix - b.matrix) / torch.hypot(a.stderr, b.stderr)
    correlation = [float(torch.corrcoef(torch.stack([a.matrix[i], b.matrix[i]]))[0, 1]) for i in range(4)]
    print(f"\nvmap vs {other}: max |z| {float(z.abs().max()):.2f}, row correlations {correlation}")
    assert bool(a.stderr.gt(0).all())
    assert float(z.abs().max()) < 6
    assert min(correlation) > 0.5


# --------------------------------------------------------------------------- the sampler


def test_sampler_stores_cuda_weights_and_groups_on_the_cpu_and_draws_as_with_cpu_tensors() -> None:
    dataset = TensorDataset(torch.arange(60))
    weights, groups = torch.tensor([1.0, 3.0, 0.5]), torch.arange(60) % 3

    def draws(sampler: lp.WeightedDistributedSampler) -> list[int]:
        sampler.set_epoch(1)
        return list(sampler)

    on_cpu = lp.WeightedDistributedSampler(dataset, weights=weights, groups=groups, seed=3)
    on_gpu = lp.WeightedDistributedSampler(
        dataset, weights=weights.to(DEVICE), groups=groups.to(DEVICE), seed=3
    )
    assert on_gpu.weights.device.type == "cpu" and on_gpu.weights.dtype == torch.float64
    assert on_gpu.groups is not None and on_gpu.groups.device.type == "cpu"
    assert draws(on_gpu) == draws(on_cpu)
    new = torch.tensor([0.2, 1.0, 4.0], dtype=torch.float16)  # any float dtype, validated to float64
    on_cpu.set_weights(new)
    on_gpu.set_weights(new.to(DEVICE))
    assert on_gpu.weights.device.type == "cpu" and torch.equal(on_gpu.weights, on_cpu.weights)
    assert draws(on_gpu) == draws(on_cpu)
    with pytest.raises(ValueError, match="NaN"):
        on_gpu.set_weights(torch.tensor([1.0, float("nan"), 1.0], device=DEVICE))
    assert torch.equal(on_gpu.weights, on_cpu.weights)  # unchanged after the rejected update


def test_datamodule_set_weights_with_cuda_tensors_before_and_after_the_sampler_exists() -> None:
    train, _, labels = sources(0)
    data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
    data.set_weights(torch.tensor(SIZES, dtype=torch.float32, device=DEVICE))
    assert data.weights is not None and data.weights.device.type == "cpu"
    assert data.state_dict()["weights"].device.type == "cpu"
    loader = data.train_dataloader()
    assert data.sampler is not None and data.sampler.weights.tolist() == list(SIZES)
    data.set_weights(torch.tensor([1.0, 1.0], device=DEVICE))
    assert data.weights is not None and data.weights.device.type == "cpu"
    assert data.state_dict()["sampler"]["weights"].device.type == "cpu"
    assert len(list(loader)) == len(loader)


# --------------------------------------------------------------------------- callbacks in a CUDA Trainer


def _trainer(tmp_path, callbacks, max_steps: int, **kwargs) -> L.Trainer:
    options = dict(
        max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        accelerator="cuda", devices=1,
    )  # fmt: skip
    options.update(kwargs)
    return L.Trainer(**options)


class _Watch(L.Callback):
    """Records, after every training batch, the LightningModule's device and the estimate objects that an
    estimation callback has published (``latest``): one new object per estimate."""

    def __init__(self, callback: L.Callback) -> None:
        self.callback = callback
        self.devices: set[str] = set()
        self.results: list[object] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.devices.add(pl_module.device.type)
        latest = getattr(self.callback, "latest", None)
        if latest is not None and all(latest is not r for r in self.results):
            self.results.append(latest)


LLC_CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=3, num_draws=15, batch_size=16)


BF16 = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a GPU with bfloat16"
)


@pytest.mark.parametrize("precision", ["32-true", pytest.param("bf16-mixed", marks=BF16)])
def test_llc_callback_on_cuda_leaves_training_unchanged(tmp_path, precision: str) -> None:
    """The BatchNorm + Dropout module of the CPU isolation test, on cuda (in the Trainer's precision): the
    weights, BatchNorm statistics and the CUDA generator (Dropout draws from it) end as in a run without
    the callback, and every estimate is finite."""

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = RegressionModule()
        _trainer(tmp_path, callbacks, max_steps=24, precision=precision).fit(model)
        return model, torch.cuda.get_rng_state()

    plain, plain_rng = fit([])
    callback = lp.LLCCallback(LLC_CONFIG, every_n_train_steps=4, progress=False)
    watch = _Watch(callback)
    model, rng = fit([callback, watch])
    assert watch.devices == {"cuda"}
    assert len(watch.results) == 6  # steps 4, 8, ..., 24
    for result in watch.results:
        assert isinstance(result, lp.LLCResult) and math.isfinite(result.mean) and result.diverged_chains == 0
    assert torch.equal(rng, plain_rng)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_patterning_and_llc_callbacks_on_cuda_move_weight_toward_the_probe(tmp_path) -> None:
    """The CPU patterning problem (tests/patterning_problem.py) on cuda: a −1 shift of the B-probe loss
    raises B's sampling mass above its natural share and lowers the probe loss below the baseline's; an
    LLCCallback runs beside it."""
    train, held_out_b, labels = sources(0)

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LinearRegressor()
        data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
        data.set_weights(torch.tensor(SIZES, dtype=torch.float64))
        _trainer(tmp_path, callbacks, max_steps=60).fit(model, datamodule=data)
        return model, data

    baseline, _ = fit([])
    llc = lp.LLCCallback(LLC_CONFIG, every_n_train_steps=20, progress=False)
    watch = _Watch(llc)
    model, data = fit([patterning_callback(held_out_b, -1.0, every=10), llc, watch])
    assert watch.devices == {"cuda"}
    assert len(watch.results) == 3  # steps 20, 40, 60
    assert all(math.isfinite(result.mean) for result in watch.results)  # type: ignore[attr-defined]
    assert data.sampler is not None and data.sampler.version == 6  # an update at steps 10, 20, ..., 60
    assert data.weights is not None and data.weights.device.type == "cpu"
    mass_b = float(data.weights[1] / data.weights.sum())
    print(f"\nmass of B {mass_b:.3f} (natural {SIZES[1] / sum(SIZES):.3f})")
    assert mass_b > SIZES[1] / sum(SIZES)
    assert probe_loss(model.cpu(), held_out_b) < probe_loss(baseline.cpu(), held_out_b)
