"""Parity with the reference implementation, devinterp 2.0.1 ``devinterp/slt/susceptibilities.py``.

1. Formula: fed the same recorded losses, our running sums (``FullChainSums``, ``RestrictedChainSums``)
   and ``restricted_chi`` reproduce ``compute_susceptibilities`` to float64 round-off; ``plain_chi`` is
   the two-pass sample covariance.
2. End to end (slow): devinterp's ``susceptibilities`` and ``estimate_susceptibilities`` with
   ``Restricted`` observables, on the same tiny language model and data, agree within Monte-Carlo error.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lightning_patterning as lp
from lightning_patterning.estimators.columns import ProbeColumns
from lightning_patterning.estimators.probe import ProbeSet
from lightning_patterning.estimators.streaming import (
    FullChainSums,
    RestrictedChainSums,
    plain_chi,
    reduce_sums,
    restricted_chi,
)
from lightning_patterning.estimators.susceptibilities import estimate_susceptibilities
from lightning_patterning.observables import Restricted


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny models: intra-op threads only add synchronization cost. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- 1. formula parity

CHAINS, DRAWS, TOKENS = 3, 40, 5
TASK = "pre-training"  # the sampling task: its per-draw mean loss plays L
PROBES = {"probe-a": 4, "probe b": 3}  # name -> sequences; ids need devinterp's to_obs_id
RESTRICTIONS = ["l0h1", "l1h0"]


def _record(active: torch.Tensor) -> SimpleNamespace:
    """The part of a ``DrawRecord`` the running sums read."""
    return SimpleNamespace(active=active)


def _synthetic_runs(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Per weight restriction, random per-draw losses ``(chain, draw, batch, token_pos)`` of the task and
    the probes (correlated through a per-draw level so the covariances are not all noise)."""
    rng = np.random.default_rng(seed)
    runs = {}
    for name in ["full", *RESTRICTIONS]:
        level = rng.gamma(2.0, 0.2, size=(CHAINS, DRAWS, 1, 1))
        arrays = {
            TASK: 2.0 + level + 0.3 * rng.random((CHAINS, DRAWS, 6, TOKENS)),
            **{
                probe: 1.0
                + rng.random((1, 1, size, TOKENS)) * level
                + 0.5 * rng.random((CHAINS, DRAWS, size, TOKENS))
                for probe, size in PROBES.items()
            },
        }
        arrays["init_loss"] = 2.0 + 0.1 * rng.random((CHAINS, TOKENS))
        runs[name] = arrays
    return runs


def _datatree(arrays: dict[str, np.ndarray]):
    """The layout ``compute_susceptibilities`` reads from a ``sample()`` output."""
    import xarray as xr
    from devinterp.slt.observables import to_obs_id

    variables = {"init_loss": (("chain", "token_pos"), arrays["init_loss"])}
    rng = np.random.default_rng(1)
    for task in [TASK, *PROBES]:
        obs = to_obs_id(task)
        loss = arrays[task]
        variables[f"loss_{obs}"] = (("chain", "draw", f"batch_{obs}", "token_pos"), loss)
        ids = rng.integers(0, 50, size=(loss.shape[2], TOKENS + 1))
        variables[f"input_ids_{obs}"] = ((f"batch_{obs}", "token"), ids)
    return xr.DataTree(dataset=xr.Dataset(variables))


def _devinterp_rows(out) -> dict[str, np.ndarray]:
    """``{wr: χ̃ over (probe, batch, token_pos)}`` in the order of ``PROBES``, from devinterp's output."""
    from devinterp.slt.observables import to_obs_id

    sus = out["susceptibilities"].dataset
    names = list(sus.attrs["dataset_id_to_name"])
    rows = {}
    for j, wr in enumerate(sus["wr"].values.tolist()):
        pieces = []
        for probe, size in PROBES.items():
            index = names.index(to_obs_id(probe))
            selected = sus["dataset_id"].values == index
            batch = sus["batch"].values[selected]
            position = sus["target_position"].values[selected] - 1
            values = np.empty((size, TOKENS))
            values[batch, position] = sus["sus"].values[selected, j]
            pieces.append(values.ravel())
        rows[str(wr)] = np.concatenate(pieces)
    return rows


def _draws(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` [chain, draw] (mean task loss) and ``ℓ`` [chain, draw, N], N = (probe, batch, token_pos)."""
    loss = torch.from_numpy(arrays[TASK].mean(axis=(2, 3)))
    probe = torch.cat(
        [torch.from_numpy(arrays[p].reshape(CHAINS, DRAWS, -1)) for p in PROBES],
        dim=2,
    )
    return loss, probe


def test_restricted_chi_equals_devinterp_compute_susceptibilities() -> None:
    from devinterp.slt.susceptibilities import compute_susceptibilities

    runs = _synthetic_runs()
    reference = _devinterp_rows(compute_susceptibilities({k: _datatree(v) for k, v in runs.items()}, TASK))
    assert sorted(reference) == sorted(RESTRICTIONS)

    size = sum(PROBES.values()) * TOKENS
    active = torch.ones(CHAINS, dtype=torch.bool)
    loss, probe = _draws(runs["full"])
    full = FullChainSums(CHAINS, size, 0)
    for t in range(DRAWS):
        full.add(_record(active), loss[:, t], probe[:, t], torch.zeros(CHAINS, 0, dtype=torch.float64))
    pooled_full = {k: v.sum(dim=0) for k, v in full.sums.items()}
    full_delta = (pooled_full["L"] - pooled_full["l"]) / pooled_full["n"]  # E_full[L] − E_full[ℓ_z]
    # devinterp's φ = (mean task loss) − mean of the full run's init_loss over chains and positions.
    center = float(runs["full"]["init_loss"].mean())

    restricted = {}
    for name in RESTRICTIONS:
        loss_c, probe_c = _draws(runs[name])
        sums = RestrictedChainSums(CHAINS, size, center)
        for t in range(DRAWS):
            sums.add(_record(active), loss_c[:, t], probe_c[:, t])
        restricted[name] = sums
        pooled = {k: v.sum(dim=0, keepdim=True) for k, v in sums.sums.items()}
        chi, _ = restricted_chi(pooled, full_delta)
        scale = np.abs(reference[name]).max()
        print(
            f"\n{name}: max |ours − devinterp| = {np.abs(chi[0].numpy() - reference[name]).max():.2e}"
            f" (max |χ̃| = {scale:.2e})"
        )
        np.testing.assert_allclose(chi[0].numpy(), reference[name], rtol=1e-10, atol=1e-12 * scale)

    # The whole reduction (all-reduce layout, pooling, result object) gives the same rows in float32.
    probe_set = ProbeColumns(ProbeSet(TensorDataset(torch.zeros(size, 1))), [(torch.zeros(size), None)])
    observables = [Restricted(name, params=["unused"]) for name in RESTRICTIONS]
    config = lp.SGLDConfig(num_chains=CHAINS, num_draws=DRAWS, nbeta=10.0)
    result = reduce_sums(
        full, restricted, observables, [], probe_set, list(range(CHAINS)), config, center, lambda t: t
    )
    assert result.names == RESTRICTIONS and result.kinds == ["Restricted"] * 2
    for i, name in enumerate(RESTRICTIONS):
        np.testing.assert_allclose(result.matrix[i].double().numpy(), reference[name], rtol=1e-5, atol=1e-9)
        # μ of a Restricted row is the restricted LLC, nβ·(E_C[L] − L(w*)).
        loss_c, _ = _draws(runs[name])
        assert float(result.mu[i]) == pytest.approx(10.0 * (float(loss_c.mean()) - center), rel=1e-5)
    assert bool(torch.isfinite(result.stderr).all()) and bool((result.stderr > 0).all())


def test_plain_chi_is_the_sample_covariance() -> None:
    """``plain_chi`` of the running sums = −(two-pass covariance of φ with ℓ_z − L), pooled over chains and
    per chain; draws of inactive (diverged) chains are skipped."""
    rng = np.random.default_rng(2)
    chains, draws, size, k = 4, 60, 7, 2
    loss = torch.from_numpy(1.0 + rng.random((chains, draws)))
    probe = torch.from_numpy(rng.random((chains, draws, size))) + loss[..., None]
    phi = torch.from_numpy(rng.random((chains, draws, k))) + loss[..., None] ** 2
    sums = FullChainSums(chains, size, k)
    inactive_after = {3: 25}  # chain 3 diverges at draw 25
    for t in range(draws):
        active = torch.tensor([t < inactive_after.get(c, draws) for c in range(chains)])
        sums.add(_record(active), loss[:, t], probe[:, t], phi[:, t])

    def covariance(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [draws, k], [draws, N] -> [k, N]
        return (a - a.mean(0)).T @ (b - b.mean(0)) / len(a)

    delta = (probe - loss[..., None]).numpy()
    kept = [phi[c, : inactive_after.get(c, draws)].numpy() for c in range(chains)]
    kept_delta = [delta[c, : inactive_after.get(c, draws)] for c in range(chains)]
    pooled = {key: v.sum(dim=0, keepdim=True) for key, v in sums.sums.items()}
    chi, mu = plain_chi(pooled)
    expected = -covariance(np.concatenate(kept), np.concatenate(kept_delta))
    np.testing.assert_allclose(chi[0].numpy(), expected, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(mu[0].numpy(), np.concatenate(kept).mean(0), rtol=1e-12)
    per_chain, _ = plain_chi(sums.sums)
    for c in range(chains):
        np.testing.assert_allclose(
            per_chain[c].numpy(), -covariance(kept[c], kept_delta[c]), rtol=1e-10, atol=1e-13
        )
    # Dropping a chain zeroes its sums: the pooled estimate is then that of the other chains.
    sums.drop(torch.tensor([False, False, False, True]))
    pooled = {key: v.sum(dim=0, keepdim=True) for key, v in sums.sums.items()}
    expected = -covariance(np.concatenate(kept[:3]), np.concatenate(kept_delta[:3]))
    np.testing.assert_allclose(plain_chi(pooled)[0][0].numpy(), expected, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- 2. end to end

VOCAB, WINDOW, WIDTH = 32, 9, 16  # windows of 9 tokens: 8 predicted positions
LM = dict(lr=1e-2, nbeta=30.0, localization=100.0, chains=16, draws=500, burnin=100, between=2, batch=32)
COMPONENTS = {"embed": ["embed.weight"], "unembed_bias": ["unembed.bias"]}


class Bigram(nn.Module):
    """Embedding → linear read-out: next-token logits ``[batch, positions, vocab]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.unembed = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.embed(input_ids))


def _token_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross entropy ``[batch, positions]`` (devinterp's default loss)."""
    logits = model(input_ids)[:, :-1]
    return nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1), reduction="none"
    ).view(input_ids.shape[0], -1)


def _window_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample loss for our estimator: the window's mean per-token cross entropy."""
    (input_ids,) = batch
    return _token_losses(model, input_ids).mean(dim=1)


def _language_data() -> tuple[torch.Tensor, torch.Tensor, Bigram]:
    """96 training windows of a random sparse Markov chain; 64 probe windows, half from the chain and
    half uniformly random (all distinct); a bigram model trained on the training windows."""
    generator = torch.Generator().manual_seed(0)
    transitions = torch.softmax(3 * torch.randn(VOCAB, VOCAB, generator=generator), dim=1)

    def markov(count: int) -> torch.Tensor:
        ids = torch.empty(count, WINDOW, dtype=torch.long)
        ids[:, 0] = torch.randint(VOCAB, (count,), generator=generator)
        for t in range(1, WINDOW):
            ids[:, t] = torch.multinomial(transitions[ids[:, t - 1]], 1, generator=generator)[:, 0]
        return ids

    train = markov(96)
    probe = torch.cat([markov(32), torch.randint(VOCAB, (32, WINDOW), generator=generator)])
    assert len({tuple(row) for row in probe.tolist()}) == len(probe)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Bigram()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(300):
        optimizer.zero_grad()
        _token_losses(model, train).mean().backward()
        optimizer.step()
    return train, probe, model


def _per_window(out, probe: torch.Tensor) -> dict[str, np.ndarray]:
    """devinterp's per-token χ̃ averaged over each window's positions, in the order of ``probe``."""
    sus, context = out["susceptibilities"].dataset, out["context"].dataset
    count = len(probe)
    windows = context["input_ids"].values.reshape(count, WINDOW)
    lookup = {tuple(row): i for i, row in enumerate(probe.tolist())}
    order = [lookup[tuple(row)] for row in windows.tolist()]
    rows = {}
    for j, wr in enumerate(sus["wr"].values.tolist()):
        values = np.empty(count)
        values[order] = sus["sus"].values[:, j].reshape(count, WINDOW - 1).mean(axis=1)
        rows[str(wr)] = values
    return rows


def _devinterp_run(model: nn.Module, train: torch.Tensor, probe: torch.Tensor, path) -> dict:
    """devinterp's estimate, its jackknife standard errors (leave one chain out of every chain set) and
    its restricted LLCs."""
    import xarray as xr
    from datasets import Dataset
    from devinterp.slt.susceptibilities import compute_susceptibilities, susceptibilities

    def dataset(ids: torch.Tensor) -> Dataset:
        return Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng():
            out = susceptibilities(
                model,
                dataset(train),
                # The sampling task is the whole training set (3 batches of 32 = 96 windows), the same
                # windows our fixed loss batches cover; the probe takes all 64 probe windows.
                {"train": dataset(train), "probe": (dataset(probe), len(probe) // LM["batch"])},
                {"full": None, **{name: dict.fromkeys(params) for name, params in COMPONENTS.items()}},
                sampling_task="train",
                lr=LM["lr"],
                n_beta=LM["nbeta"],
                localization=LM["localization"],
                num_chains=LM["chains"],
                num_draws=LM["draws"],
                num_burnin_steps=LM["burnin"],
                num_steps_bw_draws=LM["between"],
                batch_size=LM["batch"],
                # L(w*) over exactly one pass of the 3 training batches (its default, 32 batches, weights
                # 2 of the 3 batches one pass more than the third).
                num_init_loss_batches=3,
                # Independent minibatch streams per chain, so the chains are independent replicates.
                match_sampling_input_ids_across_chains=False,
                device="cpu",
                output_path=path / "samples.zarr",
            )
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    estimate = _per_window(out, probe)
    trees = {
        name: xr.open_datatree(str(path / f"samples_{name}.zarr"), engine="zarr", consolidated=False)
        for name in ["full", *COMPONENTS]
    }
    chains = LM["chains"]
    replicates = []
    for left_out in range(chains):
        keep = [c for c in range(chains) if c != left_out]
        subset = {name: xr.DataTree(dataset=tree.dataset.isel(chain=keep)) for name, tree in trees.items()}
        replicates.append(_per_window(compute_susceptibilities(subset, "train"), probe))
    stderr = {}
    for name in COMPONENTS:
        stack = np.stack([r[name] for r in replicates])
        stderr[name] = np.sqrt((chains - 1) / chains * ((stack - stack.mean(axis=0)) ** 2).sum(axis=0))
    init = float(trees["full"].dataset["init_loss"].values.mean())
    llc = {}
    for name in COMPONENTS:
        per_chain = trees[name].dataset["loss_train"].values.mean(axis=(1, 2, 3))
        llc[name] = (
            LM["nbeta"] * (float(per_chain.mean()) - init),
            LM["nbeta"] * float(per_chain.std(ddof=1)) / math.sqrt(chains),
        )
    return {"chi": estimate, "stderr": stderr, "llc": llc, "init_loss": init}


@pytest.mark.slow
def test_restricted_rows_agree_with_devinterp_on_a_tiny_language_model(tmp_path) -> None:
    train, probe, model = _language_data()
    reference = _devinterp_run(model, train, probe, tmp_path)

    config = lp.SGLDConfig(
        lr=LM["lr"],
        nbeta=LM["nbeta"],
        localization=LM["localization"],
        num_chains=LM["chains"],
        num_draws=LM["draws"],
        num_burnin_steps=LM["burnin"],
        steps_between_draws=LM["between"],
        batch_size=LM["batch"],
        seed=0,
    )
    ours = estimate_susceptibilities(
        model,
        _window_loss,
        TensorDataset(train),
        config,
        [Restricted(name, params=params) for name, params in COMPONENTS.items()],
        TensorDataset(probe),
        loss_batches=3,  # 3 × 32 = the whole training set, devinterp's sampling-task observable here
    )
    # Both define φ = L − L(w*) with L(w*) the mean training loss at the checkpoint.
    assert ours.center_loss == pytest.approx(reference["init_loss"], rel=1e-5)
    assert ours.diverged_chains == {"full": 0, **dict.fromkeys(COMPONENTS, 0)}

    for i, name in enumerate(COMPONENTS):
        a, se_a = ours.matrix[i].double().numpy(), ours.stderr[i].double().numpy()
        b, se_b = reference["chi"][name], reference["stderr"][name]
        z = (a - b) / np.hypot(se_a, se_b)
        corr = float(np.corrcoef(a, b)[0, 1])
        slope = float(np.polyfit(b, a, 1)[0])
        llc_b, llc_se_b = reference["llc"][name]
        llc_z = (float(ours.mu[i]) - llc_b) / (math.sqrt(2) * llc_se_b)  # same sampler and chains: same SE
        print(
            f"\n{name}: corr {corr:.3f}, slope {slope:.3f}, row std ours {a.std():.3e} / devinterp "
            f"{b.std():.3e}, median SE ours {np.median(se_a):.2e} / devinterp {np.median(se_b):.2e}, "
            f"z rms {np.sqrt(np.mean(z**2)):.2f}, max |z| {np.abs(z).max():.2f}; "
            f"restricted LLC ours {float(ours.mu[i]):.4f}, devinterp {llc_b:.4f} ± {llc_se_b:.4f}"
        )
        assert corr > 0.9, name
        assert 0.8 < slope < 1.25, name
        # Same estimator, independent chains: the raw values agree within the combined jackknife error.
        assert np.sqrt(np.mean(z**2)) < 1.6, name
        assert np.abs(z).max() < 4.5, name
        assert abs(np.mean(a - b)) < 3 * np.sqrt(np.mean(se_a**2 + se_b**2)), name
        # Our stderr is of the same size as the spread of devinterp's chains.
        assert 0.5 < np.median(se_a) / np.median(se_b) < 2.0, name
        assert abs(llc_z) < 4, name
