"""estimate_susceptibilities against ground truths (docs/concepts/susceptibilities.md,
docs/concepts/patterning.md).

1. Linear response: on a two-source regression mixture, ``nβ·χ_A`` (the estimator's group column for
   source A) equals the finite-difference derivative of the posterior mean of a probe loss when the data
   distribution is tilted toward A, ``q_h = (1 − h)·q + h·q_A``, measured by re-sampling at ``±h``. The
   loss is an exact quadratic, so both numbers are also checked against the Gaussian posterior in closed
   form. Sign: shifting weight toward a source lowers the loss on that source's held-out data.
2. Groups: a group's column is the mean of its members' per-sample columns on the same draws, for every
   way of naming groups (labels, a sample field, a dataset attribute, a function).
3. PCA: ``χ†·u_j = v_j/σ_j`` (solve_intervention on the standardized matrix).
4. Bad input and the file format.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import lightning_patterning as lp
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.estimators.susceptibilities import estimate_susceptibilities
from lightning_patterning.observables import LLC, Custom, ProbeLoss, Restricted
from lightning_patterning.patterning.solve import solve_intervention
from lightning_patterning.sgld.batches import SampleSource
from lightning_patterning.sgld.chains import ChainRunner
from lightning_patterning.sgld.restrict import resolve_param_masks


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models: intra-op threads only add synchronization cost. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the mixture

N_A = N_B = 50
N = N_A + N_B
D = 3
NBETA = 100.0
# The design is whitened so that the Hessian of the training loss is exactly 2·I: the tempered posterior
# is isotropic with precision P = 2nβ. Step size ε = 0.04/P: SGLD relaxes in ≈ 2/(εP) = 50 steps and its
# stationary covariance (P − εP²/4)⁻¹ exceeds the true P⁻¹ by 1% (that bias enters χ̂ but not the mean
# shift the finite difference measures; it is far below the Monte-Carlo error of χ̂).
LR = 0.04 / (2 * NBETA)
H = 0.2  # the FD's central error is 0.2% here (closed form below); large enough to beat the noise


@dataclass
class Mixture:
    """Two linear sources, A and B, fitted jointly by least squares.

    ``train`` holds ``(x, y, key)`` with key 1 for A and 0 for B; held-out sets carry key 2 (weight 1
    whatever ``h``). ``loss(h)`` weights training sample z by ``(1 − h) + h·(n/n_A)·1[z ∈ A]``, so that the
    SGLD target ``nβ·L_h`` is the training loss of ``q_h = (1 − h)·q + h·q_A``.
    """

    train: TensorDataset
    held_out_a: TensorDataset
    held_out_b: TensorDataset
    solution: torch.Tensor  # [D + 1] least-squares weights and bias (float64)
    labels: list[str]  # "A" / "B" per training sample

    def model(self) -> nn.Linear:
        model = nn.Linear(D, 1)
        with torch.no_grad():
            model.weight.copy_(self.solution[:D].float().unsqueeze(0))
            model.bias.copy_(self.solution[D:].float())
        return model

    @staticmethod
    def loss(h: float = 0.0):
        weights = torch.tensor([1.0 - h, 1.0 - h + h * N / N_A, 1.0])

        def loss_fn(module: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
            x, y, key = batch
            return weights[key] * (module(x).squeeze(-1) - y).square()

        return loss_fn


def _make_mixture() -> Mixture:
    generator = torch.Generator().manual_seed(0)
    a_true, b_true = torch.tensor([1.0, -0.5, 0.5]), torch.tensor([0.0, 0.5, -0.5])
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    x = x - x.mean(dim=0)
    x = torch.linalg.solve_triangular(torch.linalg.cholesky(x.T @ x / N), x.T, upper=False).T.float()
    is_a = torch.arange(N) < N_A
    y = torch.where(is_a, x @ a_true + 0.3, x @ b_true - 0.3) + 0.1 * torch.randn(N, generator=generator)
    design = torch.cat([x, torch.ones(N, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.squeeze(1)

    def held_out(true: torch.Tensor, offset: float) -> TensorDataset:
        xs = torch.randn(400, D, generator=generator)
        ys = xs @ true + offset + 0.1 * torch.randn(400, generator=generator)
        return TensorDataset(xs, ys, torch.full((400,), 2))

    return Mixture(
        train=TensorDataset(x, y, is_a.long()),
        held_out_a=held_out(a_true, 0.3),
        held_out_b=held_out(b_true, -0.3),
        solution=solution,
        labels=["A" if flag else "B" for flag in is_a.tolist()],
    )


@pytest.fixture(scope="module")
def mixture() -> Mixture:
    return _make_mixture()


def _config(**overrides: Any) -> lp.SGLDConfig:
    """Full-batch SGLD (batch = n: no minibatch noise) on the tempered posterior, no localization."""
    settings: dict[str, Any] = dict(
        lr=LR,
        nbeta=NBETA,
        localization=0.0,
        batch_size=N,
        paired=False,
        seed=0,
    )
    settings.update(overrides)
    return lp.SGLDConfig(**settings)


# --------------------------------------------------------------------------- closed form


def _quadratic(dataset: TensorDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A, c, e`` with mean squared error ``wᵀAw − 2cᵀw + e`` over ``dataset`` (w = weights and bias)."""
    x, y, _ = dataset.tensors
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    y = y.double()
    return design.T @ design / len(x), design.T @ y / len(x), (y @ y) / len(x)


def _exact_mean_probe_loss(mixture: Mixture, h: float, lr: float) -> float:
    """``⟨φ_B⟩`` under the stationary law of SGLD at ``q_h``: the energy ``nβ·L_h`` is quadratic, so the
    chain's law is Gaussian with the exact mean ``m_h`` and covariance ``(P_h − εP_h²/4)⁻¹``
    (``lr = 0``: the posterior itself)."""
    x, y, key = mixture.train.tensors
    design = torch.cat([x, torch.ones(N, 1)], dim=1).double()
    omega = torch.where(key == 1, 1.0 - h + h * N / N_A, 1.0 - h).double()
    hessian = 2 * (design.T * omega) @ design / N
    gradient = 2 * (design.T * omega) @ (design @ mixture.solution - y.double()) / N
    precision = NBETA * hessian
    mean = mixture.solution - torch.linalg.solve(precision, NBETA * gradient)
    covariance = torch.linalg.inv(precision - lr * precision @ precision / 4)
    a_b, c_b, e_b = _quadratic(mixture.held_out_b)
    return float(mean @ a_b @ mean - 2 * c_b @ mean + e_b + torch.trace(a_b @ covariance))


def _exact_nbeta_chi_a(mixture: Mixture, lr: float) -> float:
    """``−nβ·Cov[φ_B, L_A − L]`` under the same Gaussian at ``h = 0``: for ``δ ~ N(0, Σ)``,
    ``Cov[gᵀδ + δᵀAδ, kᵀδ + δᵀBδ] = gᵀΣk + 2·tr(AΣBΣ)``."""
    w = mixture.solution
    a, c, _ = _quadratic(mixture.train)
    x, y, key = mixture.train.tensors
    members = TensorDataset(x[key == 1], y[key == 1], key[key == 1])
    a_a, c_a, _ = _quadratic(members)
    a_b, c_b, _ = _quadratic(mixture.held_out_b)
    precision = NBETA * 2 * a
    sigma = torch.linalg.inv(precision - lr * precision @ precision / 4)
    grad_phi = 2 * (a_b @ w - c_b)
    grad_delta = 2 * (a_a @ w - c_a) - 2 * (a @ w - c)
    cov = grad_phi @ sigma @ grad_delta + 2 * torch.trace(a_b @ sigma @ (a_a - a) @ sigma)
    return float(-NBETA * cov)


# --------------------------------------------------------------------------- 1. linear response

ESTIMATE = dict(num_chains=64, num_burnin_steps=200, num_draws=400, steps_between_draws=10)
FINITE_DIFFERENCE = dict(num_chains=8, num_burnin_steps=500, num_draws=200, steps_between_draws=5, seed=1)


@pytest.fixture(scope="module")
def mixture_chi(mixture: Mixture) -> Susceptibilities:
    """χ at the least-squares solution: probe = the whole training set, columns = sources A and B."""
    return estimate_susceptibilities(
        mixture.model(),
        Mixture.loss(0.0),
        mixture.train,
        _config(**ESTIMATE),
        [ProbeLoss("probe_B", mixture.held_out_b), ProbeLoss("probe_A", mixture.held_out_a)],
        mixture.train,
        groups=mixture.labels,
        loss_batches=1,  # one full batch: L is the training loss itself
    )


def _probe_b_per_chain(mixture: Mixture, h: float) -> torch.Tensor:
    """Per chain, the time average of ``φ_B`` over full-batch SGLD draws at ``q_h``."""
    config = _config(**FINITE_DIFFERENCE)
    model = mixture.model()
    runner = ChainRunner(
        model, Mixture.loss(h), SampleSource(mixture.train), config, resolve_param_masks(model, None)
    )
    probe = list(mixture.held_out_b.tensors)
    totals = torch.zeros(config.num_chains, dtype=torch.float64)

    def on_draw(record) -> None:
        totals.add_(record.per_sample_losses(probe).double().mean(dim=1))

    summary = runner.run(on_draw)
    assert not bool(summary.diverged.any())
    return totals / config.num_draws


def test_linear_response_matches_finite_difference(mixture: Mixture, mixture_chi: Susceptibilities) -> None:
    """(⟨φ⟩_{+h} − ⟨φ⟩_{−h})/2h = nβ·χ_A within Monte-Carlo error.

    The ±h runs share their seeds (common random numbers): every chain at +h sees the same noise as its
    twin at −h, so the per-chain differences are nearly noise-free and their spread is the FD's error.
    """
    assert mixture_chi.group_names == ["A", "B"]
    assert mixture_chi.diverged_chains == {"full": 0}
    column = mixture_chi.group_names.index("A")
    row = mixture_chi.names.index("probe_B")
    response = NBETA * float(mixture_chi.matrix[row, column])
    response_se = NBETA * float(mixture_chi.stderr[row, column])

    plus, minus = _probe_b_per_chain(mixture, +H), _probe_b_per_chain(mixture, -H)
    per_chain = (plus - minus) / (2 * H)
    fd = float(per_chain.mean())
    fd_se = float(per_chain.std() / math.sqrt(len(per_chain)))
    combined = math.hypot(response_se, fd_se)

    exact_fd = (_exact_mean_probe_loss(mixture, H, LR) - _exact_mean_probe_loss(mixture, -H, LR)) / (2 * H)
    exact_chi = _exact_nbeta_chi_a(mixture, LR)
    step = 1e-3
    derivative = (
        _exact_mean_probe_loss(mixture, step, 0.0) - _exact_mean_probe_loss(mixture, -step, 0.0)
    ) / (2 * step)
    print(
        f"\nfinite difference (h = {H}): {fd:.4f} ± {fd_se:.4f}"
        f"\nnβ·χ_A (estimator):          {response:.4f} ± {response_se:.4f}"
        f"   z = {(fd - response) / combined:+.2f}"
        f"\nclosed form: SGLD law FD {exact_fd:.4f}, SGLD law nβ·χ_A {exact_chi:.4f}, "
        f"posterior d⟨φ⟩/dh {derivative:.4f}"
    )
    assert response > 0  # tilting toward A moves the fit away from B
    assert response_se < 0.04 * response  # the comparison below is informative
    assert abs(fd - response) < 3 * combined
    # Both against the closed form of the sampler's Gaussian stationary law.
    assert abs(response - exact_chi) < 3 * response_se
    assert abs(fd - exact_fd) < 3 * fd_se + 1e-3 * abs(exact_fd)
    # The closed-form FD at this h and ε is the posterior's derivative to within 1%, and that derivative is
    # the posterior's nβ·χ_A (the identity under test, here in exact arithmetic).
    assert exact_fd == pytest.approx(derivative, rel=0.01)
    assert _exact_nbeta_chi_a(mixture, 0.0) == pytest.approx(derivative, rel=1e-4)


def test_own_source_has_negative_susceptibility(mixture_chi: Susceptibilities) -> None:
    """Up-weighting a source lowers the loss on that source's held-out data: χ < 0
    (docs/concepts/susceptibilities.md)."""
    chi = dict(zip(mixture_chi.names, mixture_chi.matrix, strict=True))
    se = dict(zip(mixture_chi.names, mixture_chi.stderr, strict=True))
    a, b = mixture_chi.group_names.index("A"), mixture_chi.group_names.index("B")
    print(f"\nχ_A(probe_A) = {float(chi['probe_A'][a]):.5f} ± {float(se['probe_A'][a]):.5f}")
    assert chi["probe_A"][a] < -5 * se["probe_A"][a]
    assert chi["probe_B"][b] < -5 * se["probe_B"][b]
    assert chi["probe_A"][b] > 5 * se["probe_A"][b]
    # L is the mean of the two equal-sized sources: L_A − L = −(L_B − L), so χ_A = −χ_B exactly.
    torch.testing.assert_close(mixture_chi.matrix[:, a], -mixture_chi.matrix[:, b], rtol=1e-4, atol=1e-7)
    # μ of a ProbeLoss is the posterior mean probe loss, above the loss at the least-squares fit.
    assert float(mixture_chi.mu[mixture_chi.names.index("probe_B")]) > 0


# --------------------------------------------------------------------------- 2. groups


class _Records(Dataset):
    """Samples as mappings ``{"x", "y", "source"}`` (source 1 for A, 0 for B); ``tag`` is a dataset
    attribute that the samples do not carry."""

    def __init__(self, mixture: Mixture) -> None:
        self.x, self.y, key = mixture.train.tensors
        self.sources = key.tolist()
        self.tag = [f"t{i % 3}" for i in range(len(key))]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.x[index], "y": self.y[index], "source": self.sources[index]}


class _HeldOutRecords(Dataset):
    """A held-out TensorDataset served as mappings, so the probe-loss observable shares ``_records_loss``."""

    def __init__(self, data: TensorDataset) -> None:
        self.x, self.y, _ = data.tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.x[index], "y": self.y[index], "source": -1}


def _records_loss(module: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return (module(batch["x"]).squeeze(-1) - batch["y"]).square()


def _weight_norm(module: nn.Module) -> torch.Tensor:
    return module.weight.square().sum()


def _group_observables(mixture: Mixture) -> list:
    return [
        ProbeLoss("probe_B", _HeldOutRecords(mixture.held_out_b)),
        LLC("llc"),
        Custom("weight_norm", _weight_norm),
        Restricted("bias", params=["bias"]),
    ]


GROUP_CONFIG = dict(lr=2e-3, num_chains=4, num_burnin_steps=20, num_draws=60, batch_size=20)


def _estimate_records(mixture: Mixture, **kwargs: Any) -> Susceptibilities:
    records = _Records(mixture)
    return estimate_susceptibilities(
        mixture.model(),
        _records_loss,
        records,
        _config(**GROUP_CONFIG),
        _group_observables(mixture),
        records,
        loss_batches=2,
        **kwargs,
    )


@pytest.fixture(scope="module")
def per_sample(mixture: Mixture) -> Susceptibilities:
    return _estimate_records(mixture)


def _magnitude_of_y(sample: dict[str, Any]) -> str:
    return "large" if abs(float(sample["y"])) > 0.5 else "small"


@pytest.mark.parametrize(
    "spec",
    ["labels", "field", "attribute", "callable"],
)
def test_group_columns_are_means_of_member_columns(
    mixture: Mixture, per_sample: Susceptibilities, spec: str
) -> None:
    records = _Records(mixture)
    names = ["A" if source == 1 else "B" for source in records.sources]
    truth = {
        "labels": names,
        "field": records.sources,
        "attribute": records.tag,
        "callable": [_magnitude_of_y(records[i]) for i in range(len(records))],
    }[spec]
    groups = {
        "labels": names,
        "field": "source",
        "attribute": "tag",
        "callable": _magnitude_of_y,
    }[spec]
    grouped = _estimate_records(mixture, groups=groups)

    assert per_sample.group_names is None and per_sample.matrix.shape == (4, N)
    assert grouped.group_names == [str(label) for label in dict.fromkeys(truth)]
    assert grouped.matrix.shape == (4, len(grouped.group_names))
    # Same seed and config: the same draws, hence the same μ.
    assert torch.equal(grouped.mu, per_sample.mu)
    for column, name in enumerate(grouped.group_names):
        members = torch.tensor([str(label) == name for label in truth])
        expected = per_sample.matrix.double()[:, members].mean(dim=1)
        scale = per_sample.matrix.abs().amax(dim=1).double()
        assert torch.all((grouped.matrix[:, column].double() - expected).abs() <= 1e-5 * scale), name
        # The jackknife error of a mean of columns is at most the mean of their errors (triangle inequality).
        bound = per_sample.stderr.double()[:, members].mean(dim=1)
        assert torch.all(grouped.stderr[:, column].double() <= bound * (1 + 1e-5)), name
    assert torch.equal(
        grouped.group_index, torch.tensor([grouped.group_names.index(str(label)) for label in truth])
    )


def test_probe_indices_and_subset_keep_dataset_ids(mixture: Mixture, per_sample: Susceptibilities) -> None:
    """A selection of probe samples gives the same columns as the full per-sample run, labelled by
    their training indices (directly by ``probe_indices`` or through a ``Subset``)."""
    chosen = [3, 97, 50, 10]
    records = _Records(mixture)
    by_index = _estimate_records(mixture, probe_indices=chosen)
    assert by_index.sample_ids.tolist() == chosen
    torch.testing.assert_close(by_index.matrix, per_sample.matrix[:, chosen], rtol=1e-5, atol=1e-8)

    subset = estimate_susceptibilities(
        mixture.model(),
        _records_loss,
        records,
        _config(**GROUP_CONFIG),
        _group_observables(mixture),
        Subset(records, chosen),
        loss_batches=2,
    )
    assert subset.sample_ids.tolist() == chosen
    assert subset.columns == [str(i) for i in chosen]
    torch.testing.assert_close(subset.matrix, by_index.matrix, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- 3. PCA and the intervention


def _check_pc_identity(chi: Susceptibilities, rtol: float) -> int:
    """``solve_intervention(standardized, ±u_j) = ±v_j/σ_j`` for σ_j above the cut-off, 0 below it.
    Returns the number of components above the cut-off."""
    u, s, v = chi.pca()
    z = chi.standardized()
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, z, rtol=1e-4, atol=1e-4)
    kept = 0
    for j in range(len(s)):
        for sign in (1.0, -1.0):
            dh = solve_intervention(z, sign * u[:, j], rtol=rtol)
            if s[j] > rtol * s[0]:
                expected = sign * v[:, j] / s[j]
                assert torch.allclose(dh, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max())), j
            else:  # u_j is orthogonal to the range of χ: the minimum-norm solution is 0
                assert float(dh.abs().max()) < 1e-3 * float((v[:, 0] / s[0]).abs().max()), j
        kept += int(s[j] > rtol * s[0])
    return kept


def test_pc_identity_on_an_estimate(per_sample: Susceptibilities) -> None:
    _, s, _ = per_sample.pca()
    print(f"\nsingular values of the standardized χ: {[round(float(x), 3) for x in s]}")
    assert float(s[-1]) > 1e-3 * float(s[0])  # four independent rows
    assert _check_pc_identity(per_sample, rtol=1e-6) == 4


def test_pc_identity_on_a_rank_deficient_matrix() -> None:
    generator = torch.Generator().manual_seed(3)
    loadings = torch.randn(5, 2, generator=generator)
    data = torch.randn(2, 40, generator=generator)
    data = data - data.mean(dim=1, keepdim=True)  # centred rows: the standardized matrix keeps rank 2
    chi = _synthetic(loadings @ data)
    assert _check_pc_identity(chi, rtol=1e-4) == 2


def _synthetic(matrix: torch.Tensor, **overrides: Any) -> Susceptibilities:
    k, n = matrix.shape
    fields: dict[str, Any] = dict(
        matrix=matrix.float(),
        stderr=torch.full((k, n), 0.01),
        mu=torch.arange(k, dtype=torch.float32),
        names=[f"o{i}" for i in range(k)],
        kinds=["ProbeLoss"] * k,
        sample_ids=torch.arange(n),
        group_names=None,
        group_index=None,
        nbeta=30.0,
        center_loss=0.5,
        diverged_chains={"full": 0},
        config=_config().to_dict(),
    )
    fields.update(overrides)
    return Susceptibilities(**fields)


# --------------------------------------------------------------------------- 4. bad input


SMALL = dict(num_chains=2, num_burnin_steps=0, num_draws=3)


def test_duplicate_observable_name(mixture: Mixture) -> None:
    observables = [ProbeLoss("twice", mixture.held_out_b), LLC("twice")]
    with pytest.raises(ValueError, match="'twice'"):
        estimate_susceptibilities(
            mixture.model(), Mixture.loss(), mixture.train, _config(**SMALL), observables, mixture.train
        )


@pytest.mark.parametrize("index", [N, -1])
def test_probe_index_outside_the_dataset(mixture: Mixture, index: int) -> None:
    with pytest.raises((IndexError, ValueError), match=rf"\[0, {N}\)"):
        estimate_susceptibilities(
            mixture.model(),
            Mixture.loss(),
            mixture.train,
            _config(**SMALL),
            [LLC()],
            mixture.train,
            probe_indices=[0, index],
        )


def test_restricted_pattern_that_matches_nothing(mixture: Mixture) -> None:
    with pytest.raises(ValueError, match=r"no_such_layer\.\*"):
        estimate_susceptibilities(
            mixture.model(),
            Mixture.loss(),
            mixture.train,
            _config(**SMALL),
            [Restricted("ghost", params=["no_such_layer.*"])],
            mixture.train,
        )


def test_custom_observable_must_be_scalar(mixture: Mixture) -> None:
    with pytest.raises(ValueError, match="scalar"):
        estimate_susceptibilities(
            mixture.model(),
            Mixture.loss(),
            mixture.train,
            _config(**SMALL),
            [Custom("weights", lambda module: module.weight)],
            mixture.train,
        )


def test_load_rejects_foreign_and_corrupt_files(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(4096))
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": 1}, foreign)
    tensors_only = tmp_path / "tensors.pt"
    torch.save({"meta": "not json", "tensors": {}}, tensors_only)
    other_format = tmp_path / "other.pt"
    torch.save({"meta": '{"format": "something else", "version": 1}', "tensors": {}}, other_format)
    pickled = tmp_path / "pickled.pt"
    torch.save({"meta": _Unsafe(), "tensors": {}}, pickled)  # loading it would need arbitrary code
    truncated = tmp_path / "truncated.pt"
    good = _synthetic(torch.randn(2, 5)).save(tmp_path / "good.pt")
    truncated.write_bytes(good.read_bytes()[:200])
    for path in (corrupt, foreign, tensors_only, other_format, pickled, truncated):
        with pytest.raises(ValueError):
            Susceptibilities.load(path)
    with pytest.raises(FileNotFoundError):
        Susceptibilities.load(tmp_path / "missing.pt")


class _Unsafe:
    pass


def _assert_same(loaded: Susceptibilities, original: Susceptibilities) -> None:
    for name in ("matrix", "stderr", "mu", "sample_ids"):
        torch.testing.assert_close(
            getattr(loaded, name), getattr(original, name), rtol=0, atol=0, equal_nan=True
        )
    if original.group_index is None:
        assert loaded.group_index is None
    else:
        assert torch.equal(loaded.group_index, original.group_index)
    for name in ("names", "kinds", "group_names", "nbeta", "diverged_chains", "config", "metadata"):
        assert getattr(loaded, name) == getattr(original, name), name
    assert loaded.center_loss == original.center_loss or (
        math.isnan(loaded.center_loss) and math.isnan(original.center_loss)
    )


def test_save_load_round_trip(tmp_path, mixture_chi: Susceptibilities, per_sample: Susceptibilities) -> None:
    mixture_chi.metadata = {"step": 12, "epoch": 1, "note": "χ"}
    for i, original in enumerate(
        [
            mixture_chi,
            per_sample,
            _synthetic(
                torch.randn(3, 4), stderr=torch.full((3, 4), math.nan), center_loss=math.nan, nbeta=2.5
            ),
        ]
    ):
        path = original.save(tmp_path / f"nested/dir/chi{i}.pt")
        loaded = Susceptibilities.load(path)
        _assert_same(loaded, original)
        assert loaded.columns == original.columns
