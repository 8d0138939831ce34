"""Per-token training weights: ``lp.weighted_loss``, the token-class rule in ``PatterningDataModule``, its
fit to a per-token solve, resume, TensorBoard and bad input (docs/how-to/tokens-as-samples.md)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_patterning as lp
from lightning_patterning.callbacks.tensorboard import log_token_weights
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.patterning.tokens import (
    class_means,
    heldout_correlation,
    solve_token_dh,
    token_patterning_step,
    weighted_mean,
)
from lightning_patterning.patterning.weights import WeightUpdate
from tests.token_lm import (
    ToyLMModule,
    markov_sequences,
    per_token_loss,
    token_class,
    token_datamodule,
    valid_positions,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(tmp_path, steps: int, callbacks: list | None = None, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_steps=steps,
        callbacks=callbacks or [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


# --------------------------------------------------------------------------- the loss


def test_weighted_mean_normalises_weights_over_the_valid_tokens() -> None:
    losses = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    ones = torch.ones(2, 3)
    assert float(weighted_mean(losses, ones, mask)) == pytest.approx(15 / 5)  # the masked NaN never enters
    weights = torch.tensor([[2.0, 1.0, 100.0], [1.0, 0.0, 1.0]])
    assert float(weighted_mean(losses, weights, mask)) == pytest.approx((2 + 2 + 3 + 5) / 5)
    assert float(weighted_mean(losses, 7 * weights, mask)) == pytest.approx(
        (2 + 2 + 3 + 5) / 5
    )  # ratios only
    assert float(weighted_mean(losses, torch.zeros(2, 3), mask)) == 0.0


def test_weighted_loss_applies_the_rule_only_while_training() -> None:
    batch = list(markov_sequences(4, 9, seed=0, min_length=4).tensors)
    module = ToyLMModule()
    output = module.per_sample_loss(batch)
    losses, mask = output
    plain = losses[mask].mean()
    torch.testing.assert_close(lp.weighted_loss(output, batch, module), plain)  # no Trainer: plain mean
    torch.testing.assert_close(lp.weighted_loss(output, batch, None), plain)
    rule = lp.TokenWeightRule(token_class, 2)
    rule.set_class_weights([1.0, 3.0])
    weights = torch.where(token_class(batch) == 1, 3.0, 1.0)
    expected = (weights * losses)[mask].sum() / weights[mask].sum()
    torch.testing.assert_close(lp.weighted_loss(output, batch, rule), expected)
    assert not torch.allclose(expected, plain)
    torch.testing.assert_close(lp.data.token_weights(batch, rule), weights / 2)  # ρ has mean 1 over classes
    with pytest.raises(ValueError, match="per-position losses"):
        lp.weighted_loss(losses.mean(dim=1), batch, rule)
    with pytest.raises(ValueError, match="shape of the per-position losses"):
        lp.weighted_loss(losses[:, 1:], batch, rule)
    with pytest.raises(TypeError, match="source"):
        lp.weighted_loss(output, batch, "self")


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0, -0.5], "negative"),
        ([1.0, float("nan")], "NaN or inf"),
        ([float("inf"), 1.0], "NaN or inf"),
        ([0.0, 0.0], "all zeros"),
        ([1.0, 1.0, 1.0], r"shape \[3\]"),
    ],
)
def test_token_weights_that_are_negative_or_not_finite_are_rejected(weights, match) -> None:
    data = token_datamodule()
    data.set_token_weights([2.0, 1.0])
    with pytest.raises(ValueError, match=rf"token weights must be 2 finite numbers >= 0.*{match}"):
        data.set_token_weights(weights)
    assert data.token_weights.tolist() == pytest.approx([4 / 3, 2 / 3])  # unchanged


def test_bad_token_rules_are_rejected() -> None:
    batch = list(markov_sequences(4, 9, seed=0).tensors)
    with pytest.raises(ValueError, match="classes in 0 … 0"):
        lp.TokenWeightRule(token_class, 1)(batch)
    with pytest.raises(ValueError, match=r"shape \[B, T\]"):
        lp.TokenWeightRule(lambda b: b[0], 8)(batch[1])
    with pytest.raises(TypeError, match="integer"):
        lp.TokenWeightRule(lambda b: b[0].float(), 8)(batch)
    with pytest.raises(ValueError, match="num_token_classes is required"):
        lp.PatterningDataModule(token_datamodule().datamodule, token_classes=token_class)
    with pytest.raises(ValueError, match="need token_classes"):
        lp.PatterningDataModule(token_datamodule().datamodule, num_token_classes=2)
    with pytest.raises(ValueError, match="token_classes=fn"):
        lp.PatterningDataModule(token_datamodule().datamodule).set_token_weights([1.0])
    rule = lp.TokenWeightRule("tests.token_lm.token_class", 2, ["other", "low"])  # an import path (YAML)
    assert rule.token_classes is token_class and rule.class_names == ["other", "low"]


# --------------------------------------------------------------------------- training


def _class_losses(module: ToyLMModule, seed: int) -> tuple[float, float]:
    held_out = list(markov_sequences(512, 17, seed=seed + 100).tensors)
    with torch.no_grad():
        losses, classes = per_token_loss(module.model, held_out), token_class(held_out)
    return float(losses[classes == 0].mean()), float(losses[classes == 1].mean())


def _fit(tmp_path, seed: int, weights: list[float], steps: int = 60) -> ToyLMModule:
    L.seed_everything(seed, verbose=False)
    module = ToyLMModule()
    data = token_datamodule(seed)
    data.set_token_weights(weights)
    _trainer(tmp_path, steps).fit(module, datamodule=data)
    return module


@pytest.mark.parametrize("seed", range(3))
def test_up_weighting_a_token_class_lowers_its_loss_against_a_paired_unweighted_run(tmp_path, seed) -> None:
    """Same initialisation, data and batch order; the model's bottleneck makes the classes compete."""
    baseline = _class_losses(_fit(tmp_path, seed, [1.0, 1.0]), seed)
    up = _class_losses(_fit(tmp_path, seed, [1.0, 8.0]), seed)
    print(f"\nseed {seed}: class losses (0, 1) baseline {baseline}, class 1 up-weighted {up}")
    assert up[1] < baseline[1] - 0.01
    assert up[0] > baseline[0]  # the price: the other class fits worse


class _SetTokenWeights(L.Callback):
    def __init__(self, schedule: dict[int, list[float]]) -> None:
        self.schedule = schedule

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.schedule:
            trainer.datamodule.set_token_weights(self.schedule[trainer.global_step])


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_crash_and_resume_reproduce_the_token_weights_and_the_model_bitwise(tmp_path) -> None:
    schedule = {5: [1.0, 4.0], 20: [3.0, 1.0]}

    def fit(callbacks: list, ckpt_path=None, **kwargs: Any) -> tuple[ToyLMModule, lp.PatterningDataModule]:
        L.seed_everything(0, verbose=False)
        module, data = ToyLMModule(), token_datamodule(0)
        _trainer(tmp_path, 25, [_SetTokenWeights(schedule), *callbacks], **kwargs).fit(
            module, datamodule=data, ckpt_path=ckpt_path
        )
        return module, data

    full, full_data = fit([])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit([checkpoint, _CrashAt(15)], enable_checkpointing=True)
    resumed, resumed_data = fit([], ckpt_path=next((tmp_path / "ckpt").glob("*step=10.ckpt")))
    assert resumed.applied == full.applied[10:]  # steps 11-25: the step-5 weights came from the checkpoint
    assert resumed.applied[0] == pytest.approx([0.4, 1.6])
    assert torch.equal(resumed_data.token_weights, full_data.token_weights)
    assert resumed_data.token_rule.version == full_data.token_rule.version == 2
    for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- fitting the rule to χ


def _token_chi(matrix: torch.Tensor, mask: torch.Tensor) -> Susceptibilities:
    k = matrix.shape[0]
    return Susceptibilities(
        matrix=torch.where(mask, matrix, torch.nan).float(),
        stderr=torch.full_like(matrix, 0.01),
        mu=torch.zeros(k),
        names=[f"o{i}" for i in range(k)],
        kinds=["ProbeLoss"] * k,
        sample_ids=torch.arange(matrix.shape[1]),
        group_names=None,
        group_index=None,
        nbeta=30.0,
        center_loss=1.0,
        diverged_chains={"full": 0},
        config={},
        token_mask=mask,
    )


def test_heldout_correlation_recovers_the_share_of_dh_explained_by_classes() -> None:
    """dh = class effect + independent noise: the held-out correlation is √(signal / (signal + noise))."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(3, (400, 30), generator=generator)
    effect = torch.tensor([-1.0, 0.0, 1.0])[classes]  # variance 2/3
    noise = torch.randn(400, 30, generator=generator) * math.sqrt(2 / 3)  # the same variance
    dh = (effect + noise).double()
    dh[:, -3:] = math.nan  # invalid positions are skipped
    r = heldout_correlation(dh, classes)
    assert r == pytest.approx(math.sqrt(0.5), abs=0.03)
    assert heldout_correlation(noise.double(), classes) == pytest.approx(0.0, abs=0.05)
    assert heldout_correlation(effect.double(), classes) == pytest.approx(1.0)
    means = class_means(dh, classes, 4)  # class 3 has no token: the overall mean
    assert means[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=0.05)
    assert float(means[3]) == pytest.approx(float(dh[torch.isfinite(dh)].mean()))


def test_a_token_patterning_step_raises_the_class_whose_tokens_lower_the_target() -> None:
    """χ of the probe loss is −1 on class-1 tokens and +1 on class-0 tokens: lowering the probe loss
    (Shift −1) must raise class 1's weight, raising it must lower it, in both solve coordinates."""
    batch = list(markov_sequences(12, 9, seed=3, min_length=4).tensors)
    mask, classes = valid_positions(batch), token_class(batch)
    generator = torch.Generator().manual_seed(1)
    chi = _token_chi(
        torch.where(classes == 1, -1.0, 1.0)[None] + 0.1 * torch.randn(1, *mask.shape, generator=generator),
        mask,
    )
    dh = solve_token_dh(chi, lp.targets.Shift({"o0": -1.0}))
    assert bool(torch.isnan(dh[~mask]).all()) and bool(torch.isfinite(dh[mask]).all())
    rule = lp.TokenWeightRule(token_class, 2)
    for coordinates in ("mass", "log_weights"):
        for sign in (-1.0, 1.0):
            new, info = token_patterning_step(
                chi, lp.targets.Shift({"o0": sign}), rule, classes, WeightUpdate(0.5), coordinates=coordinates
            )
            assert (float(new[1]) > float(new[0])) == (sign < 0), (coordinates, sign)
            assert float(new.mean()) == pytest.approx(1.0)
            assert info["heldout_r"] > 0.9  # dh is almost a function of the class here
    with pytest.raises(ValueError, match="per-token result"):
        solve_token_dh(chi.flattened(), lp.targets.Shift({"o0": -1.0}))


def test_token_weights_reach_tensorboard_as_histogram_and_class_scalars(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, 1, logger=logger)
    trainer.fit(ToyLMModule(), datamodule=token_datamodule())
    rule = lp.TokenWeightRule(token_class, 2, ["other", "low"])
    rule.set_class_weights([1.0, 3.0])
    batch = list(markov_sequences(8, 9, seed=0, min_length=4).tensors)
    log_token_weights(trainer, rule, step=7, batch=batch, mask=valid_positions(batch))
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "token_weights/per_token" in tags["histograms"]
    low = events.Scalars("token_weights/class/low")
    assert [(e.step, round(e.value, 6)) for e in low] == [(7, 1.5)]
    histogram = events.Histograms("token_weights/per_token")[0].histogram_value
    assert histogram.num == int(valid_positions(batch).sum())
    assert histogram.sum == pytest.approx(histogram.num)  # mean-1 weights, as weighted_loss applies them
