"""Tokens as samples in the estimators (docs/concepts/susceptibilities.md, "Tokens as samples").

The ground truth: a loss function returning per-position losses ``[B, T]`` with a mask must give exactly
the estimates of the per-sample estimator run on a dataset in which every valid token is a sample of its
own. With full-batch SGLD (every minibatch is the whole data set) both runs see the same minibatch mean
at every step and the same noise, so χ, its standard error, μ and the LLC agree to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

import lightning_patterning as lp
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.observables import LLC, ProbeLoss, Restricted
from tests.token_lm import (
    FlatTokens,
    ToyLM,
    flat_token_loss,
    markov_sequences,
    masked_token_loss,
    per_token_loss,
    token_class,
    valid_positions,
)

SEQUENCES = 16
LENGTH = 9  # 8 positions per sequence
PROBE = [0, 3, 5, 8, 13]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    train = markov_sequences(SEQUENCES, LENGTH, seed=0, min_length=3)
    held_out = markov_sequences(6, LENGTH, seed=1, min_length=3)
    flat = FlatTokens(train)
    probe_tokens = [i for i, n in enumerate(flat.sequence.tolist()) if n in PROBE]
    return train, held_out, flat, probe_tokens


def _model() -> ToyLM:
    torch.manual_seed(0)
    return ToyLM(dim=3).double()


def _config(batch_size: int, **overrides: Any) -> lp.SGLDConfig:
    settings: dict[str, Any] = dict(
        lr=1e-3,
        nbeta=20.0,
        localization=10.0,
        num_chains=3,
        num_draws=15,
        num_burnin_steps=5,
        batch_size=batch_size,
        seed=3,
    )
    settings.update(overrides)
    return lp.SGLDConfig(**settings)


def _observables(held_out) -> list:
    return [ProbeLoss("held_out", held_out), LLC(), Restricted("embed", params=["embed.*"])]


def _token_run(data, **kwargs: Any) -> Susceptibilities:
    train, held_out, _, _ = data
    return lp.estimate_susceptibilities(
        _model(),
        masked_token_loss,
        train,
        _config(SEQUENCES),
        _observables(held_out),
        train,
        probe_indices=PROBE,
        loss_batches=1,
        **kwargs,
    )


def _flat_run(data, **kwargs: Any) -> Susceptibilities:
    _, held_out, flat, probe_tokens = data
    return lp.estimate_susceptibilities(
        _model(),
        flat_token_loss,
        flat,
        _config(len(flat)),
        _observables(FlatTokens(held_out)),
        flat,
        probe_indices=probe_tokens,
        loss_batches=1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def token_chi(data) -> Susceptibilities:
    return _token_run(data)


@pytest.fixture(scope="module")
def flat_chi(data) -> Susceptibilities:
    return _flat_run(data)


def test_per_token_chi_equals_chi_of_tokens_flattened_into_samples(data, token_chi, flat_chi) -> None:
    train, _, flat, probe_tokens = data
    mask = valid_positions(list(train.tensors))[PROBE]
    assert token_chi.matrix.shape == (3, len(PROBE), LENGTH - 1)
    assert token_chi.stderr.shape == token_chi.matrix.shape
    assert torch.equal(token_chi.token_mask, mask) and not bool(mask.all())  # some positions are padding
    assert bool(torch.isnan(token_chi.matrix[:, ~mask]).all()) and bool(
        torch.isnan(token_chi.stderr[:, ~mask]).all()
    )
    assert token_chi.diverged_chains == flat_chi.diverged_chains == {"full": 0, "embed": 0}
    assert flat_chi.matrix.shape == (3, int(mask.sum()))
    scale = flat_chi.matrix.abs().amax(dim=1, keepdim=True)
    assert float(scale.min()) > 0
    torch.testing.assert_close(token_chi.matrix[:, mask] / scale, flat_chi.matrix / scale, rtol=0, atol=1e-9)
    torch.testing.assert_close(token_chi.stderr[:, mask] / scale, flat_chi.stderr / scale, rtol=0, atol=1e-9)
    torch.testing.assert_close(token_chi.mu, flat_chi.mu, rtol=1e-9, atol=0)
    assert token_chi.center_loss == pytest.approx(flat_chi.center_loss, rel=1e-12)
    # The flattened view carries each token's probe sequence and position.
    view = token_chi.flattened()
    assert view.sample_ids.tolist() == flat.sequence[probe_tokens].tolist()
    assert view.positions.tolist() == flat.where[probe_tokens, 1].tolist()
    assert token_chi.columns[:2] == [
        f"{view.sample_ids[0]}:{view.positions[0]}",
        f"{view.sample_ids[1]}:{view.positions[1]}",
    ]


def test_per_token_llc_equals_llc_of_tokens_flattened_into_samples(data) -> None:
    """``estimate_llc`` with a [B, T] loss uses the mean over the minibatch's valid positions."""
    train, _, flat, _ = data
    token = lp.estimate_llc(_model(), masked_token_loss, train, _config(SEQUENCES, num_draws=30))
    flattened = lp.estimate_llc(_model(), flat_token_loss, flat, _config(len(flat), num_draws=30))
    assert math.isfinite(token.mean)  # the model is not at a minimum: the sign is not the point
    # Minibatch losses are summed in float32 (as for per-sample losses): nβ·L·1e-6 ≈ 5e-5 of rounding.
    assert token.mean == pytest.approx(flattened.mean, abs=2e-4)
    torch.testing.assert_close(token.per_chain, flattened.per_chain, rtol=0, atol=2e-4)
    # Padding counted as samples (the mask ignored) gives another loss, so the comparison can fail.
    unmasked = lp.estimate_llc(_model(), per_token_loss, train, _config(SEQUENCES, num_draws=30))
    assert unmasked.init_loss != pytest.approx(token.init_loss, rel=1e-3)


@pytest.mark.parametrize(
    "overrides", [dict(chain_mode="sequential"), dict(shared_batches=True)], ids=["sequential", "shared"]
)
def test_other_chain_paths_equal_tokens_flattened_into_samples(data, overrides) -> None:
    """The sequential chain path and shared minibatches stack (losses, mask) outputs their own way; they too
    give the per-sample estimates of the flattened dataset (full-batch minibatches, same noise)."""
    train, held_out, flat, probe_tokens = data
    token_config = replace(_config(SEQUENCES), **overrides)
    flat_config = replace(_config(len(flat)), **overrides)
    token = lp.estimate_llc(_model(), masked_token_loss, train, token_config)
    flattened = lp.estimate_llc(_model(), flat_token_loss, flat, flat_config)
    assert token.mode == flattened.mode == ("sequential" if "chain_mode" in overrides else "vmap")
    torch.testing.assert_close(token.per_chain, flattened.per_chain, rtol=0, atol=2e-4)
    observables = [ProbeLoss("held_out", held_out), LLC()]
    chi = lp.estimate_susceptibilities(
        _model(),
        masked_token_loss,
        train,
        token_config,
        observables,
        train,
        probe_indices=PROBE,
        loss_batches=1,
    )
    flat_observables = [ProbeLoss("held_out", FlatTokens(held_out)), LLC()]
    flat_chi = lp.estimate_susceptibilities(
        _model(),
        flat_token_loss,
        flat,
        flat_config,
        flat_observables,
        flat,
        probe_indices=probe_tokens,
        loss_batches=1,
    )
    scale = flat_chi.matrix.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(chi.flattened().matrix / scale, flat_chi.matrix / scale, rtol=0, atol=1e-9)


def test_pca_and_standardized_work_on_the_valid_token_columns(token_chi, flat_chi) -> None:
    u, s, v = token_chi.pca()
    fu, fs, fv = flat_chi.pca()
    mask = token_chi.token_mask
    assert v.shape == (int(mask.sum()), len(s))
    torch.testing.assert_close(s, fs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, fu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v, fv, rtol=1e-4, atol=1e-5)
    z = token_chi.standardized()
    assert z.shape == token_chi.matrix.shape and bool(torch.isnan(z[:, ~mask]).all())
    torch.testing.assert_close(z[:, mask], flat_chi.standardized(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, z[:, mask], rtol=1e-4, atol=1e-4)


def test_token_groups_and_sequence_groups_average_valid_tokens(data, token_chi) -> None:
    train, _, flat, probe_tokens = data
    mask = token_chi.token_mask
    batch = [t[PROBE] for t in train.tensors]
    classes = token_class(batch)
    by_class = _token_run(data, token_groups=token_class)
    assert by_class.group_names == ["0", "1"] and by_class.matrix.shape == (3, 2)
    assert torch.equal(by_class.group_index, torch.where(mask, classes, -1))
    torch.testing.assert_close(by_class.mu, token_chi.mu, rtol=0, atol=0)
    for g in range(2):
        members = mask & (classes == g)
        expected = token_chi.matrix[:, members].double().mean(dim=1)
        torch.testing.assert_close(by_class.matrix[:, g].double(), expected, rtol=1e-5, atol=1e-9)
    same = _token_run(data, token_groups=torch.where(mask, classes, -1))  # a tensor of labels works too
    torch.testing.assert_close(same.matrix, by_class.matrix, rtol=0, atol=0)

    halves = ["first" if i < 8 else "second" for i in PROBE]
    by_sequence = _token_run(data, groups=halves)
    assert by_sequence.group_names == ["first", "second"]
    assert by_sequence.group_index.shape == mask.shape
    flat_grouped = _flat_run(
        data, groups=["first" if int(n) < 8 else "second" for n in flat.sequence[probe_tokens]]
    )
    scale = flat_grouped.matrix.abs().amax(dim=1, keepdim=True)
    torch.testing.assert_close(by_sequence.matrix / scale, flat_grouped.matrix / scale, rtol=0, atol=1e-9)


def test_save_load_round_trip_of_token_results(tmp_path, data, token_chi) -> None:
    grouped = _token_run(data, token_groups=token_class)
    for i, original in enumerate([token_chi, grouped, token_chi.flattened()]):
        loaded = Susceptibilities.load(original.save(tmp_path / f"chi{i}.pt"))
        for name in ("matrix", "stderr", "mu", "sample_ids"):
            torch.testing.assert_close(
                getattr(loaded, name), getattr(original, name), rtol=0, atol=0, equal_nan=True
            )
        for name in ("token_mask", "group_index", "positions"):
            a, b = getattr(loaded, name), getattr(original, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert loaded.columns == original.columns and loaded.group_names == original.group_names


# --------------------------------------------------------------------------- bad input


def _small(batch_size: int = 4) -> lp.SGLDConfig:
    return _config(batch_size, num_chains=1, num_draws=2, num_burnin_steps=0)


@pytest.mark.parametrize(
    "loss_fn, error, match",
    [
        (lambda m, b: per_token_loss(m, b).unsqueeze(-1), ValueError, r"shape \[batch\].*\[batch, T\]"),
        (lambda m, b: per_token_loss(m, b).sum(), ValueError, r"shape \[batch\]"),
        (lambda m, b: (per_token_loss(m, b), valid_positions(b)[:, :-1]), ValueError, r"mask.*shape"),
        (
            lambda m, b: (per_token_loss(m, b).mean(1), valid_positions(b)[:, 0]),
            ValueError,
            r"mask.*\[B, T\]",
        ),
        (lambda m, b: (per_token_loss(m, b), valid_positions(b).long()), TypeError, r"mask.*boolean"),
        (lambda m, b: (per_token_loss(m, b), valid_positions(b) & False), ValueError, "no valid position"),
        (lambda m, b: (per_token_loss(m, b), valid_positions(b), 1), TypeError, "3 items"),
    ],
    ids=["rank3", "scalar", "mask_shape", "mask_on_per_sample", "mask_dtype", "no_valid", "triple"],
)
def test_bad_loss_outputs_are_rejected_clearly(data, loss_fn, error, match) -> None:
    train = data[0]
    with pytest.raises(error, match=match):
        lp.estimate_llc(_model(), loss_fn, train, _small())
    with pytest.raises(error, match=match):
        lp.estimate_susceptibilities(_model(), loss_fn, train, _small(), [LLC()], train)


def test_a_minibatch_without_valid_positions_is_an_error_not_a_nan(data) -> None:
    """The checkpoint's check passes (its minibatch has valid positions); a later minibatch has none."""
    train = data[0]

    calls = []

    def empty_after_the_check(model, batch):
        calls.append(1)
        losses, mask = masked_token_loss(model, batch)
        return losses, mask & (len(calls) == 1)

    with pytest.raises(ValueError, match="no valid position in an SGLD minibatch"):
        lp.estimate_llc(_model(), empty_after_the_check, train, _small())


def test_a_probe_without_valid_positions_and_bad_token_groups_are_rejected(data) -> None:
    train = data[0]

    def no_probe_position(model, batch):
        losses, mask = masked_token_loss(model, batch)
        return losses, mask & (batch[1] > 100)[:, None] if len(batch[1]) == len(PROBE) else mask

    with pytest.raises(ValueError, match="no valid position in the whole probe"):
        lp.estimate_susceptibilities(
            _model(), no_probe_position, train, _small(), [LLC()], train, probe_indices=PROBE
        )
    with pytest.raises(ValueError, match=r"token_groups.*shape \[5, 8\]"):
        lp.estimate_susceptibilities(
            _model(),
            masked_token_loss,
            train,
            _small(),
            [LLC()],
            train,
            probe_indices=PROBE,
            token_groups=torch.zeros(5, 7, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="per-position losses"):
        lp.estimate_susceptibilities(
            _model(),
            lambda m, b: per_token_loss(m, b).mean(1),
            train,
            _small(),
            [LLC()],
            train,
            token_groups=torch.zeros(SEQUENCES, 8, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="not both"):
        lp.estimate_susceptibilities(
            _model(),
            masked_token_loss,
            train,
            _small(),
            [LLC()],
            train,
            probe_indices=PROBE,
            groups=[0] * len(PROBE),
            token_groups=token_class,
        )
