"""The parentheses recipe: generator invariants (Dyck TRUE, unequal-count FALSE, equal-count non-nested
OOD never trained on), determinism, uniform Dyck words, the classifier's per-sample loss (padding
invariance, vmap, ``lp.estimate_llc``), the LightningCLI on every config, the arms, the weights, the
statistics and the sweep."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

import lightning_patterning as lp
from recipes.parentheses.data import (
    CLS,
    PAD,
    ParenthesesData,
    ParenthesesDataset,
    boundary_violation,
    boundary_violations,
    collate_trimmed,
    count_imbalance,
    decode,
    encode,
    is_equal_count,
    is_nested,
    max_depth,
    min_prefix_depth,
    min_prefix_depths,
    random_dyck_steps,
    random_false_steps,
)
from recipes.parentheses.model import ParenthesesClassifier, evaluate
from tests.recipes.parentheses_helpers import BASE, CONFIGS, TINY, small_data, tiny_model

ARMS = sorted(path.stem for path in (CONFIGS / "arms").glob("*.yaml"))
DIRECTIONS = CONFIGS.parent / "directions"


def test_string_helpers() -> None:
    assert max_depth("(()())") == 2 and max_depth("") == 0 and max_depth("))") == 0
    assert min_prefix_depth("(())") == 0 and min_prefix_depth(")(") == -1 and min_prefix_depth("))((") == -2
    assert min_prefix_depth("())(") == -1 and min_prefix_depth("(()))(()") == -1
    assert count_imbalance("((()") == 2 and count_imbalance(")(") == 0 and count_imbalance("(") == 1
    assert is_nested("(()())") and not is_nested(")(") and not is_nested("(()")
    assert is_equal_count(")(") and not is_equal_count("(()")
    assert boundary_violation(")(") and boundary_violation("()(") and not boundary_violation("(()))(()")
    with pytest.raises(ValueError, match="'\\(' and '\\)'"):
        max_depth("(a)")
    tokens = encode(["()", ")(", "())((", "(()))(()"], max_length=8)
    assert tokens.shape == (4, 9) and bool((tokens[:, 0] == CLS).all()) and int(tokens[0, 3]) == PAD
    assert decode(tokens) == ["()", ")(", "())((", "(()))(()"]
    assert min_prefix_depths(tokens).tolist() == [0, -1, -1, -1]
    assert boundary_violations(tokens).tolist() == [False, True, True, False]


@pytest.mark.parametrize("length", [2, 6, 10])
def test_dyck_words_are_uniform(length: int) -> None:
    words = random_dyck_steps(6000, length, torch.Generator().manual_seed(length))
    strings = ["".join("(" if s > 0 else ")" for s in row) for row in words.tolist()]
    assert all(is_nested(s) for s in strings)
    catalan = math.comb(length, length // 2) // (length // 2 + 1)
    counts = collections.Counter(strings)
    assert len(counts) == catalan
    expected = len(strings) / catalan
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < catalan - 1 + 6 * math.sqrt(2 * (catalan - 1)) + 1  # far inside the χ² tail


@pytest.mark.parametrize("kind", ["random", "flip"])
@pytest.mark.parametrize("length", [1, 2, 5, 8])
def test_false_strings_never_have_equal_counts(kind: str, length: int) -> None:
    steps = random_false_steps(4000, length, torch.Generator().manual_seed(1), kind, close_fraction=0.25)
    assert steps.shape == (4000, length) and bool((steps.abs() == 1).all())
    assert bool((steps.sum(dim=1) != 0).all())
    assert abs((steps.sum(dim=1) < 0).float().mean().item() - 0.25) < 0.03
    if kind == "flip":
        assert set(steps.sum(dim=1).abs().tolist()) == {1 if length % 2 else 2}


@pytest.mark.parametrize(
    "options", [{}, {"false_kind": "flip", "odd_false": True, "min_length": 1, "false_close_fraction": 1.0}]
)
def test_data_module_invariants(options: dict[str, object]) -> None:
    data = small_data(**options)
    train = data.train_set
    assert isinstance(train, ParenthesesDataset) and len(train) == 2000 and int(train.labels.sum()) == 1000
    tokens, label, index = train[5]
    assert tokens.shape == (13,) and label.dtype == torch.long and int(index) == 5
    for dataset in (train, data.val_set):
        for s, label in zip(dataset.strings, dataset.labels.tolist(), strict=True):
            assert 1 <= len(s) <= 12
            if label == 1:
                assert is_nested(s) and len(s) % 2 == 0
            else:
                assert count_imbalance(s) > 0
    ood = data.ood_test.strings
    assert len(ood) == 300 and data.ood_test.labels.eq(0).all()
    assert all(is_equal_count(s) and not is_nested(s) and min_prefix_depth(s) < 0 for s in ood)
    probe = data.ood_probe_nested.strings
    assert len(probe) == 100 and all(is_equal_count(s) and not is_nested(s) for s in probe)
    assert not set(probe) & set(ood)  # held out from the OOD test set
    assert data.ood_probe_nested.labels.eq(0).all() and data.ood_probe_equal.labels.eq(1).all()
    assert data.ood_probe_equal.strings == probe
    trained = set(train.strings)
    assert not trained & (set(ood) | set(probe))  # OOD strings are never trained on


def test_data_is_deterministic_per_seed() -> None:
    first, again, other = small_data(seed=3), small_data(seed=3), small_data(seed=4)
    for name in ("train_set", "val_set", "ood_test", "ood_probe_nested"):
        assert torch.equal(getattr(first, name).tokens, getattr(again, name).tokens)
        assert not torch.equal(getattr(first, name).tokens, getattr(other, name).tokens)
    assert torch.equal(first.train_set.labels, again.train_set.labels)
    # the evaluation sets do not depend on the training size
    assert torch.equal(small_data(seed=3, n_train=500).ood_test.tokens, first.ood_test.tokens)


def test_loaders_trim_padding() -> None:
    data = small_data(batch_size=16)
    tokens, labels, indices = next(iter(data.train_dataloader()))
    assert tokens.shape[0] == 16 and tokens.shape[1] <= 13 and labels.shape == indices.shape == (16,)
    assert bool((tokens != PAD).sum(dim=1).max() == tokens.shape[1])
    short = collate_trimmed([data.ood_test[i] for i in range(4)])
    assert short[0].shape[1] == int((data.ood_test.tokens[:4] != PAD).sum(dim=1).max())
    assert len(data.val_dataloader()) == 2


def test_per_sample_loss_and_padding_invariance() -> None:
    model, data = tiny_model(), small_data()
    tokens, labels, indices = data.train_set[:8]
    losses = model.per_sample_loss([tokens, labels, indices])
    assert losses.shape == (8,) and bool(torch.isfinite(losses).all())
    trimmed = collate_trimmed([data.train_set[i] for i in range(8)])
    torch.testing.assert_close(model.per_sample_loss(trimmed), losses, rtol=1e-5, atol=1e-6)
    mean_pool = ParenthesesClassifier(
        d_model=16, n_layers=1, n_heads=2, d_mlp=16, max_length=12, pooling="mean"
    )
    torch.testing.assert_close(
        mean_pool.per_sample_loss(trimmed), mean_pool.per_sample_loss([tokens, labels])
    )
    assert model.model.attention_patterns(tokens).shape == (1, 8, 2, 13, 13)
    metrics = evaluate(model, data.val_set.tokens, data.val_set.labels, data.ood_test.tokens)
    assert 0.0 <= metrics["nested_score"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    with pytest.raises(TypeError, match="tokens"):
        model.per_sample_loss([torch.randn(2, 3), labels[:2]])


def test_label_smoothing_loss_has_its_minimum_at_a_finite_logit_gap() -> None:
    """ε-smoothed cross entropy: target (1 − ε/2, ε/2), so the loss is the target's cross entropy and is
    minimal where softmax = target, at a logit gap log((2 − ε)/ε) (plain CE keeps falling as it grows)."""
    data, eps = small_data(), 0.1
    smoothed = ParenthesesClassifier(
        d_model=16, n_layers=1, n_heads=2, d_mlp=16, max_length=12, label_smoothing=eps
    )
    tokens, labels, _ = data.train_set[:8]
    logits = smoothed(tokens)
    target = torch.full_like(logits, eps / 2).scatter_(1, labels[:, None], 1 - eps / 2)
    expected = -(target * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(smoothed.per_sample_loss([tokens, labels]), expected)
    gaps = torch.linspace(0.0, 8.0, 801)
    loss = -(
        (1 - eps / 2) * torch.nn.functional.logsigmoid(gaps) + eps / 2 * torch.nn.functional.logsigmoid(-gaps)
    )
    assert float(gaps[loss.argmin()]) == pytest.approx(math.log((2 - eps) / eps), abs=0.01)
    with pytest.raises(ValueError, match="label_smoothing"):
        ParenthesesClassifier(label_smoothing=1.0)


def test_forward_under_vmap_over_stacked_parameters() -> None:
    model, data = tiny_model(), small_data()
    copies = [tiny_model(seed) for seed in range(3)]
    params, buffers = stack_module_state(copies)
    batch = collate_trimmed([data.train_set[i] for i in range(6)])

    def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, (p, b), args=(batch[0],), strict=False).logsumexp(-1).sum()

    values = vmap(loss)(params, buffers)
    for i, copy in enumerate(copies):
        torch.testing.assert_close(values[i], copy(batch[0]).logsumexp(-1).sum(), rtol=1e-5, atol=1e-4)


def test_estimate_llc_runs_on_the_vmap_path() -> None:
    model, data = tiny_model(), small_data()
    config = lp.SGLDConfig(num_chains=2, num_draws=5, batch_size=16, lr=1e-4, nbeta=30, localization=300)
    result = lp.estimate_llc(model, lambda m, b: m.per_sample_loss(b), data.train_set, config)
    assert result.mode == "vmap" and math.isfinite(result.mean) and result.diverged_chains == 0
    via_loader = lp.estimate_llc(model, lambda m, b: m.per_sample_loss(b), data.train_dataloader(), config)
    assert via_loader.mode == "vmap" and math.isfinite(via_loader.mean)


VARIANTS = sorted(path.name for path in (CONFIGS / "variants").glob("*.yaml"))


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_cli_parses_the_base_config_and_every_variant(variant: str | None) -> None:
    pytest.importorskip("jsonargparse")
    from recipes.parentheses.cli import main

    overlay = [] if variant is None else ["--config", str(CONFIGS / "variants" / variant)]
    cli = main(
        ["--config", str(BASE), *overlay, "--data.max_length=16", "--trainer.logger=false"],
        run=False,
        save_config_callback=None,
    )
    assert isinstance(cli.model, ParenthesesClassifier) and isinstance(cli.datamodule, ParenthesesData)
    assert cli.datamodule.max_length == 16 and cli.model.hparams.max_length == 16  # linked
    assert cli.trainer.max_steps > 0


def test_variant_overlays_are_a_few_lines() -> None:
    for variant in VARIANTS:
        lines = (CONFIGS / "variants" / variant).read_text().splitlines()
        values = [line for line in lines if not line.startswith("#") and line.split(":", 1)[-1].strip()]
        assert len(values) <= 6, f"{variant} sets {len(values)} values; an overlay changes only a few"


def test_cli_fits_and_reports(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from recipes.parentheses.cli import main

    args = [
        "fit",
        "--config",
        str(BASE),
        "--seed_everything=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        *TINY,
    ]
    cli = main(args, save_config_callback=None)
    assert cli.trainer.global_step == 3
    assert set(cli.final_metrics) >= {
        "accuracy",
        "nested_score",
        "nested_score_dip1",
        "nested_score_dip2plus",
    }


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
def test_causal_attention_and_poolings(pooling: str) -> None:
    torch.manual_seed(0)
    model = ParenthesesClassifier(
        d_model=16, n_layers=2, n_heads=2, d_mlp=16, max_length=12, pooling=pooling, causal=True
    )
    data = small_data()
    tokens, labels, _ = data.train_set[:8]
    trimmed = collate_trimmed([data.train_set[i] for i in range(8)])
    torch.testing.assert_close(model.per_sample_loss(trimmed), model.per_sample_loss([tokens, labels]))
    patterns = model.model.attention_patterns(tokens)
    assert torch.all(patterns.triu(diagonal=1) == 0)
    logits = model(tokens)
    if pooling == "cls":  # under causal attention the CLS position sees only itself
        torch.testing.assert_close(logits, logits[:1].expand_as(logits))
    else:
        assert not torch.allclose(logits, logits[:1].expand_as(logits))


@pytest.mark.parametrize("arm", ARMS)
def test_arm_configs_parse(arm: str) -> None:
    pytest.importorskip("jsonargparse")
    from recipes.parentheses.cli import main
    from recipes.parentheses.patterning import ProbePatterning, group_keys

    args = ["--config", str(BASE), "--config", str(CONFIGS / "arms" / f"{arm}.yaml")]
    cli = main([*args, "--trainer.logger=false", "--data.n_train=64"], run=False, save_config_callback=None)
    assert isinstance(cli.datamodule, lp.PatterningDataModule)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, lp.PatterningCallback)]
    if arm.startswith("online"):
        (callback,) = callbacks
        assert isinstance(callback, ProbePatterning)
        assert callback.target.values == {"ood_nested": -1.0 if "nested" in arm else 1.0}
        assert callback.probe_attributes == ["ood_probe_nested"]
        assert [o.name for o in callback.observables] == ["ood_nested"]
    else:
        assert not callbacks
    ids, names = group_keys(cli.datamodule.datamodule.train_set)
    natural = torch.bincount(torch.tensor(ids)).double()
    if arm in ("nested", "equal"):  # natural × exp(±4.5·δ̂), δ̂ the shipped step-40 direction
        estimates = json.loads((DIRECTIONS / "d80_step40.json").read_text())["estimates"]
        assert [(e["seed"], e["step"]) for e in estimates] == [(16, 40), (17, 40)]
        mean = torch.tensor([e["delta"] for e in estimates], dtype=torch.float64).mean(dim=0)
        change = dict(
            zip(map(tuple, estimates[0]["groups"]), (mean / mean.abs().max()).tolist(), strict=True)
        )
        sign = -1.0 if arm == "equal" else 1.0
        expected = natural * torch.tensor(
            [math.exp(sign * 4.5 * change.get(n, 0.0)) for n in names], dtype=torch.float64
        )
    else:
        expected = natural
    weights = cli.datamodule.weights
    torch.testing.assert_close(weights / weights.sum(), expected / expected.sum())


def test_dyck_control_probe() -> None:
    from recipes.parentheses.patterning import ProbePatterning

    data = ParenthesesData(n_train=64, n_val=16, n_ood_test=32, n_ood_probe=40, max_length=12)
    probe = data.dyck_probe
    assert len(probe) == 40 and probe.labels.eq(1).all()
    assert all(is_nested(s) for s in probe.strings)
    with pytest.raises(ValueError, match="controls"):
        ProbePatterning(controls=["val_set"])
    with pytest.raises(ValueError, match="controls"):
        ProbePatterning(controls=["ood_probe_nested"])


def test_reference_heuristic_weights() -> None:
    from recipes.parentheses.patterning import heuristic_weights

    weights = heuristic_weights(["()", "(())", "(()())", "((", ")))(", "(((((("], [1, 1, 1, 0, 0, 0])
    assert weights.tolist() == [2.0, 3.0, 3.0, 1.0, 1.0, 2.0 / 6.0]


def test_class_balanced_heuristic_keeps_class_mass_and_ratios() -> None:
    from recipes.parentheses.patterning import class_balanced

    weights = torch.tensor([2.0, 3.0, 3.0, 1.0, 1.0, 2.0 / 6.0], dtype=torch.float64)
    labels = [1, 1, 1, 0, 0, 0]
    balanced = class_balanced(weights, labels)
    assert balanced[:3].sum().item() == pytest.approx(3.0) and balanced[3:].sum().item() == pytest.approx(3.0)
    assert (balanced[:3] / weights[:3]).tolist() == pytest.approx([3.0 / 8.0] * 3)  # ratios inside TRUE kept
    assert (balanced[3:] / weights[3:]).tolist() == pytest.approx([3.0 / (7.0 / 3.0)] * 3)


def test_groups_and_natural_mass() -> None:
    from recipes.parentheses.patterning import Sampling, group_keys, group_masses, wrap

    data = small_data()
    ids, names = group_keys(data.train_set)
    assert len(ids) == data.n_train and set(ids) == set(range(len(names)))
    for s, y, g in zip(data.train_set.strings, data.train_set.labels.tolist(), ids, strict=True):
        label, feature, _ = names[g]
        assert label == y and feature == (min(max_depth(s), 6) if y else min(count_imbalance(s), 8))
    wrapped = wrap(data, Sampling(groups="depth_length"), seed=3)
    natural = group_masses(data, None)
    assert group_masses(data, wrapped.weights) == pytest.approx(natural)
    heuristic = wrap(data, Sampling(groups="depth_length", weights="heuristic"), seed=3)
    assert heuristic.weights.numel() == data.n_train
    balanced = wrap(data, Sampling(groups="depth_length", weights="heuristic_balanced"), seed=3)
    is_true = data.train_set.labels == 1
    natural_true = is_true.double().mean().item()
    assert (balanced.weights[is_true].sum() / balanced.weights.sum()).item() == pytest.approx(natural_true)
    assert (heuristic.weights[is_true].sum() / heuristic.weights.sum()).item() > natural_true + 0.1
    for direction in (None, "no/such/file.json"):  # weights: direction needs a direction_check result
        with pytest.raises(ValueError, match=r"sampling\.direction"):
            wrap(data, Sampling(groups="depth_length", weights="direction", direction=direction), seed=3)


def test_statistics_helpers() -> None:
    from recipes.parentheses.stats import fisher_exact, t_interval, wilcoxon_signed_rank

    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.3027
    assert mean == 2.0
    assert (low, high) == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)))
    # all 5 positive: W+ = 15, p = 2 / 32
    assert wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5]) == (15.0, pytest.approx(0.0625))
    # ranks 1..4 with signs (−, +, +, +): W+ = 9; P(W+ >= 9) = 2/16 → p = 0.25
    assert wilcoxon_signed_rank([-1.0, 2.0, 3.0, 4.0]) == (9.0, pytest.approx(0.25))
    assert wilcoxon_signed_rank([0.0, 0.0]) == (0.0, 1.0)
    # scipy.stats.fisher_exact([[8, 2], [1, 5]]) → p = 0.03496503...
    assert fisher_exact(8, 2, 1, 5) == pytest.approx(0.034965, abs=1e-5)
    assert fisher_exact(3, 3, 3, 3) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_exact_wilcoxon_matches_scipy_on_ties_zeros_and_plain_samples(seed: int) -> None:
    """Our exact conditional p equals scipy's full enumeration of the 2^n sign patterns (ties and zeros
    included), and scipy's exact tie-free distribution when nothing ties."""
    import numpy as np
    from scipy import stats

    from recipes.parentheses.stats import wilcoxon_signed_rank

    rng = np.random.default_rng(seed)
    tied = np.round(rng.normal(0.05, 0.2, 12), 1)  # many ties, some zeros
    nonzero = tied[tied != 0]
    enumerated = stats.wilcoxon(nonzero, method=stats.PermutationMethod(n_resamples=np.inf))
    assert wilcoxon_signed_rank(tied.tolist())[1] == pytest.approx(enumerated.pvalue, rel=1e-9)
    plain = rng.normal(0.05, 0.2, 30)
    assert wilcoxon_signed_rank(plain.tolist())[1] == pytest.approx(
        stats.wilcoxon(plain, method="exact").pvalue, rel=1e-9
    )


def test_sweep_runs_arms_in_parallel_and_writes_tables(tmp_path: Path) -> None:
    """The main job's path: ``sweep --jobs 2`` (spawned workers), CSV/markdown/plot, resume from the CSV."""
    pytest.importorskip("jsonargparse")
    from recipes.parentheses.sweep import main

    tiny = [f"--set={arg.removeprefix('--')}" for arg in TINY if "progress_bar" not in arg]
    argv = ["--seed-list", "0", "--arms", "baseline", "nested", "--jobs", "2", "--log-dir", str(tmp_path)]
    argv += ["--results-dir", str(tmp_path), "--name", "t", *tiny]
    rows = main(argv)
    assert sorted(r["arm"] for r in rows) == ["baseline", "nested"]
    assert {p.name for p in tmp_path.iterdir()} >= {"sweep_t.csv", "sweep_t.md", "sweep_t.png"}
    text = (tmp_path / "sweep_t.md").read_text()
    assert "| baseline | 0 |" in text and "| nested | 0 |" in text  # per-seed rows
    assert "| nested − equal |" not in text  # no mirror arm ran
    assert main(argv) == rows  # resumed: nothing is run again
