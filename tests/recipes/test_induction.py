"""The induction recipe: the CLI and its configs, the data (determinism, the duplicated span, the probes),
each metric against a hand-computed case, the onset and censoring rule, and the study's figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipes.induction.data import (
    PRINTABLE,
    InductionData,
    duplicate_random_spans,
    repeated_natural,
    repeated_random,
    stdlib_files,
    stdlib_split,
)
from recipes.induction.metrics import (
    AttentionToSource,
    InContextScore,
    Onset,
    attention_to_source_sums,
    find_onset,
    in_context_score,
    prefix_matching_sources,
    previous_token_sources,
    repeat_masks,
)
from recipes.induction.model import InductionLM

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "induction" / "configs"
BASE = CONFIGS / "base.yaml"
OVERLAYS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "base.yaml")
TINY = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--model.d_model=16",
    "--model.n_heads=2",
    "--data.n_train=64",
    "--data.n_val=4",
    "--data.n_probe=4",
    "--data.context=16",
    "--data.span_min=3",
    "--data.span_max=8",
    "--data.batch_size=4",
]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_cli_parses_every_config(overlay: str | None) -> None:
    from recipes.induction.__main__ import main

    args = ["--config", str(BASE)] + (["--config", str(CONFIGS / overlay)] if overlay else [])
    cli = main(
        [*args, "--trainer.logger=false", "--trainer.accelerator=cpu"], run=False, save_config_callback=None
    )
    assert isinstance(cli.model, InductionLM) and isinstance(cli.datamodule, InductionData)
    assert cli.model.hparams.context == cli.datamodule.context  # linked
    assert cli.trainer.max_steps > 0
    if overlay is None:  # the measured configuration
        assert (cli.model.hparams.d_model, cli.model.hparams.n_heads, cli.datamodule.context) == (128, 8, 128)
        assert cli.model.hparams.lr == 0.006 and tuple(cli.model.hparams.betas) == (0.9, 0.98)
        assert cli.model.hparams.warmup_steps == 100 and cli.datamodule.batch_size == 16
        assert cli.datamodule.spans and (cli.datamodule.span_min, cli.datamodule.span_max) == (20, 60)
        assert sum(p.numel() for p in cli.model.parameters()) == 215_040
    if overlay == "paper_scale.yaml":
        assert not cli.datamodule.spans
        assert 2.5e6 < sum(p.numel() for p in cli.model.parameters()) < 3.5e6


def test_cli_fits_and_reports_onsets_and_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recipes.induction.__main__ import main

    results = tmp_path / "run.json"
    args = ["fit", "--config", str(BASE), "--seed_everything=3", f"--results={results}", *TINY]
    cli = main([*args, f"--trainer.default_root_dir={tmp_path}"], save_config_callback=None)
    assert cli.trainer.global_step == 4
    report = json.loads(results.read_text())
    assert [h["step"] for h in report["history"]] == [2, 4]
    heads = {k for k in report["final"] if k.startswith("heads/")}
    assert heads == {f"heads/prefix_l1h{h}" for h in range(2)} | {f"heads/prev_l0h{h}" for h in range(2)} | {
        "heads/prefix_max",
        "heads/prev_max",
    }
    # four steps of a tiny model: no induction yet, so both onsets are censored at the last step
    assert report["onset"] == {p: {"step": 4, "censored": True} for p in ("random", "natural")}
    assert report["seed"] == 3 and report["wall_seconds"] > 0
    assert "onset: random censored at 4, natural censored at 4" in capsys.readouterr().out


def test_warmup_is_linear_then_constant() -> None:
    model = InductionLM(lr=0.006, warmup_steps=100)
    optimizer = model.configure_optimizers()
    schedule = optimizer["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(150):
        seen.append(schedule.get_last_lr()[0])
        optimizer["optimizer"].step()
        schedule.step()
    assert seen[0] == pytest.approx(0.006 / 100) and seen[49] == pytest.approx(0.003)
    assert seen[99] == pytest.approx(0.006) and seen[149] == pytest.approx(0.006)
    assert optimizer["optimizer"].defaults["betas"] == (0.9, 0.999)


# --------------------------------------------------------------------------------------------------- data


def test_corpus_split_holds_out_every_twentieth_file() -> None:
    train, val = stdlib_split("train"), stdlib_split("val")
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.08
    first_val_file = stdlib_files()[19]
    with open(first_val_file, "rb") as handle:
        head = handle.read(200)
    assert val.startswith(head) and head not in train[:100_000]
    with pytest.raises(ValueError, match="split"):
        stdlib_split("test")


def test_duplicated_span_is_written_twice_and_nothing_else_changes() -> None:
    natural = torch.randint(
        0, 256, (2000, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    out, starts, lengths = duplicate_random_spans(natural, 20, 60, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == natural.shape
    assert int(lengths.min()) == 20 and int(lengths.max()) == 60
    first, second = starts[:, 0], starts[:, 1]
    assert bool((first >= 0).all() and (second >= first + lengths).all() and (second + lengths <= 128).all())
    assert int(first.min()) == 0 and int((second + lengths).max()) == 128  # the whole range is used
    for i in range(0, 2000, 97):
        a, b, n = int(first[i]), int(second[i]), int(lengths[i])
        span = out[i, a : a + n]
        assert torch.equal(span, out[i, b : b + n])
        assert bool(((span >= PRINTABLE[0]) & (span < PRINTABLE[1])).all())
        outside = torch.ones(128, dtype=torch.bool)
        outside[a : a + n] = outside[b : b + n] = False
        assert torch.equal(out[i, outside], natural[i, outside])
    again = duplicate_random_spans(natural, 20, 60, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip((out, starts, lengths), again, strict=True))
    with pytest.raises(ValueError, match="max_length"):
        duplicate_random_spans(natural, 20, 65, torch.Generator())
    with pytest.raises(ValueError, match="min_length"):
        duplicate_random_spans(natural, 1, 10, torch.Generator())


def test_data_module_is_deterministic_in_its_seeds() -> None:
    def make(seed: int, **kwargs: object) -> InductionData:
        return InductionData(n_train=256, n_val=8, n_probe=8, seed=seed, **kwargs)

    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.train_set.windows, b.train_set.windows)
    assert torch.equal(a.span_starts, b.span_starts) and torch.equal(a.span_lengths, b.span_lengths)
    assert not torch.equal(a.train_set.windows, c.train_set.windows)
    for name in ("val_set", "random_probe", "natural_probe"):  # probes depend on probe_seed only
        assert torch.equal(getattr(a, name).windows, getattr(c, name).windows)
    item = a.train_set[5]
    assert item.dtype == torch.long and item.shape == (128,)
    i = 5
    (s1, s2), n = a.span_starts[i].tolist(), int(a.span_lengths[i])
    assert torch.equal(item[s1 : s1 + n], item[s2 : s2 + n])
    natural = make(0, spans=False)
    assert natural.span_starts is None and natural.train_set.windows.shape == (256, 128)
    assert [len(loader.dataset) for loader in a.val_dataloader()] == [8, 8, 8]
    with pytest.raises(ValueError, match="span_max"):
        InductionData(context=64, span_max=40)
    with pytest.raises(ValueError, match="context"):
        InductionData(context=127)


def test_probes_repeat_their_first_half() -> None:
    random = repeated_random(6, 128, seed=0)
    assert random.shape == (6, 128) and torch.equal(random[:, :64], random[:, 64:])
    assert int(random.min()) >= PRINTABLE[0] and int(random.max()) < PRINTABLE[1]
    natural = repeated_natural(6, 128, seed=0)
    assert torch.equal(natural[:, :64], natural[:, 64:]) and torch.equal(natural, repeated_natural(6, 128, 0))
    assert bytes(natural[0, :64].tolist()) in stdlib_split("val")
    with pytest.raises(ValueError, match="even"):
        repeated_random(2, 127, seed=0)


# ------------------------------------------------------------------------------------------------ metrics


def test_in_context_score_is_second_copy_minus_first_copy() -> None:
    # [a, a] with m = 4, T = 8: losses j = 0…6 predict tokens 1…7; first copy targets 1..3, second 5..7
    first, second = repeat_masks(8)
    assert first.tolist() == [True, True, True, False, False, False, False]
    assert second.tolist() == [False, False, False, False, True, True, True]
    losses = torch.tensor([[2.0, 2.0, 2.0, 99.0, 0.5, 0.5, 0.5], [4.0, 4.0, 4.0, -9.0, 1.0, 1.0, 1.0]])
    # first-copy mean (2 + 4)/2 = 3, second-copy mean (0.5 + 1)/2 = 0.75: score −2.25
    assert float(in_context_score(losses)) == pytest.approx(-2.25)
    metric = InContextScore()
    metric.update(losses[:1])
    metric.update(losses[1:])
    assert float(metric.compute()) == pytest.approx(-2.25)
    assert float(metric.first_copy_loss()) == pytest.approx(3.0)
    assert float(metric.second_copy_loss()) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="even"):
        in_context_score(torch.zeros(2, 8))  # T = 9 is odd


def _pattern_from_sources(sources: torch.Tensor, length: int) -> torch.Tensor:
    """A causal attention pattern [T, T] putting all weight on ``sources[t]`` (on key 0 where none)."""
    pattern = torch.zeros(length, length)
    pattern[torch.arange(length), sources.clamp(min=0)] = 1.0
    return pattern


def test_a_perfect_previous_token_head_scores_one_and_a_uniform_head_its_mean() -> None:
    length = 8
    sources = previous_token_sources(length)
    assert sources.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6]
    perfect = _pattern_from_sources(sources, length)
    uniform = torch.tril(torch.ones(length, length)) / torch.arange(1, length + 1)[:, None]
    self_attention = torch.eye(length)
    pattern = torch.stack([perfect, uniform, self_attention])[None].expand(3, 3, length, length)
    metric = AttentionToSource("previous", n_heads=3)
    metric.update(pattern[:2])
    metric.update(pattern[2:])
    expected_uniform = sum(1 / (t + 1) for t in range(1, length)) / (length - 1)  # query t: 1/(t+1)
    torch.testing.assert_close(
        metric.compute(), torch.tensor([1.0, expected_uniform, 0.0], dtype=torch.float64)
    )


def test_a_perfect_induction_head_scores_one_on_prefix_matching_and_a_previous_token_head_zero() -> None:
    length = 8  # [a1 a2 a3 a4 a1 a2 a3 a4]: query 4 (a1) → key 1 (a2), … query 7 (a4) → key 4
    sources = prefix_matching_sources(length)
    assert sources.tolist() == [-1, -1, -1, -1, 1, 2, 3, 4]
    induction = _pattern_from_sources(sources, length)
    previous = _pattern_from_sources(previous_token_sources(length), length)
    sums, count = attention_to_source_sums(torch.stack([induction, previous])[None], sources)
    assert count == 4 and (sums / count).tolist() == [1.0, 0.0]
    metric = AttentionToSource("prefix", n_heads=2)
    metric.update(torch.stack([induction, previous])[None].expand(5, 2, length, length))
    assert metric.compute().tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="sources"):
        attention_to_source_sums(induction[None, None], sources[:4])
    with pytest.raises(ValueError, match="sources must be"):
        AttentionToSource("next", n_heads=2)


# -------------------------------------------------------------------------------------------------- onset


def test_onset_is_the_first_evaluation_below_the_threshold() -> None:
    steps = [50, 100, 150, 200, 250]
    assert find_onset(steps, [-0.1, -0.2, -1.7, -0.5, -3.0], threshold=-1.0) == Onset(150, False)
    assert find_onset(steps, [-0.1, -0.2, -1.0, -0.5, -0.9], threshold=-1.0) == Onset(250, True)  # not below
    assert find_onset(steps, [math.nan] * 5, threshold=-1.0) == Onset(250, True)
    assert find_onset([50], [-2.0], threshold=-1.0) == Onset(50, False)
    with pytest.raises(ValueError, match="increasing"):
        find_onset([100, 50], [0.0, 0.0], -1.0)
    with pytest.raises(ValueError, match="equal length"):
        find_onset([50, 100], [0.0], -1.0)
    with pytest.raises(ValueError, match="finite"):
        find_onset([50], [0.0], math.nan)


def test_the_model_records_each_onset_once_and_the_summary_censors() -> None:
    from recipes.induction.__main__ import summarize

    model = InductionLM(onset_threshold=-1.0, natural_onset_threshold=-0.3)
    model.history = [
        {"step": 50, "icl/random": -0.2, "icl/natural": -0.1},
        {"step": 100, "icl/random": -1.6, "icl/natural": -0.2},
        {"step": 150, "icl/random": -2.6, "icl/natural": -0.25},
    ]
    summary = summarize(model, wall_seconds=1.0, cpu_seconds=1.0, seed=7)
    assert summary["onset"] == {
        "random": {"step": 100, "censored": False},
        "natural": {"step": 150, "censored": True},
    }
    assert summary["final"]["step"] == 150 and summary["thresholds"] == {"random": -1.0, "natural": -0.3}


# -------------------------------------------------------------------------------------------------- study


def _fake_report(seed: int, onset: int) -> dict[str, object]:
    steps = list(range(50, 1001, 50))
    history = [
        {"step": s, "icl/random": -0.2 if s < onset else -2.0, "icl/natural": -0.1 if s < onset else -0.6}
        for s in steps
    ]
    return {"seed": seed, "thresholds": {"random": -1.0, "natural": -0.3}, "history": history}


def test_figure_of_in_context_score_per_arm(tmp_path: Path) -> None:
    from recipes.induction.study import curves, plot_in_context

    runs = {
        "baseline": [_fake_report(s, 500 + 50 * s) for s in range(3)],
        "plus": [_fake_report(s, 300 + 50 * s) for s in range(3)],
    }
    steps, values = curves(runs["baseline"], "icl/random")
    assert values.shape == (3, 20) and steps[0] == 50 and float(values[0, 9]) == -2.0  # step 500
    figure = plot_in_context(runs, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert [a.get_title().split(",")[0] for a in figure.axes] == ["in-context score"] * 2
    assert len(figure.axes[0].get_legend().get_texts()) == 3  # two arms and the threshold


def test_study_table_recomputes_onsets_at_given_thresholds() -> None:
    from recipes.induction.study import table_rows

    report = _fake_report(1000, 400)
    last = report["history"][-1]
    report.update(
        final={**last, "val/loss": 2.0, "heads/prefix_max": 0.9, "heads/prev_max": 0.9}, wall_seconds=1.0
    )
    (own,) = table_rows({"baseline": [report]})
    assert (own["onset_random"], own["censored_random"], own["onset_natural"]) == (400, 0, 400)
    (strict,) = table_rows({"baseline": [report]}, {"random": -3.0, "natural": -0.3})
    assert (strict["onset_random"], strict["censored_random"]) == (1000, 1)  # never below −3: censored


def test_study_resumes_and_pairs_seeds(tmp_path: Path) -> None:
    from recipes.induction.study import cli_args, parse_seeds, run_path, run_study

    assert parse_seeds(["1000-1003", "7"]) == [1000, 1001, 1002, 1003, 7]
    with pytest.raises(ValueError, match="distinct"):
        parse_seeds(["1-3", "2"])
    args = cli_args("plus", 5, tmp_path, tmp_path / "logs", [BASE], ["--trainer.max_steps=10"])
    assert args[-1] == "--trainer.max_steps=10" and "--seed_everything=5" in args
    assert (
        str(CONFIGS / "arms" / "plus.yaml") in args and f"--results={run_path(tmp_path, 'plus', 5)}" in args
    )
    done = run_path(tmp_path, "baseline", 1)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    run_study(["baseline"], [1], tmp_path, tmp_path / "logs", [BASE])  # exists: nothing runs
    assert done.read_text() == "{}"
