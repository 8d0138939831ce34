"""Does in-distribution accuracy fall with the weights or with the algorithm? Validity vs nested score.

Two checks of the issue's validity bar (in-distribution accuracy ≥ 99 % on every run):

* **pooled** (the default): every run of the default configuration (700 steps) already recorded in
  ``results/`` — the rows of the ``sweep_default*`` CSVs, the test runs of every direction check and
  both runs of every response-map pair — tabulated by nested score, separately for runs at natural
  weights (the baseline) and re-weighted runs (every other arm, direction and random direction). Files
  repeat runs (a combined check holds its parts' runs, a sweep copies or re-runs baseline rows, bitwise
  equal), so the same outcome of the same seed, natural or re-weighted, counts once. (This also merges
  distinct runs of a seed that end at the same boundary-only solution, nested score 0.6505 at accuracy
  1, which leaves the counts of runs below the bar as they are.) ``sweep_probe_oneoff*`` holds only such
  repeats (its arms are bitwise direction-check runs) and is not read.
  Within the NESTED end (score ≥ 0.9) a two-sided Fisher exact test compares the failure rate of natural
  and re-weighted runs: if re-weighting cost accuracy by itself (by starving a group), re-weighted runs
  would fail more often than natural ones of the same score.
* ``--errors SEED …``: trains the baseline run of each seed again (the same run as the sweep's) and counts its
  in-distribution errors by kind of string: label, whether the running depth dips below zero, count
  imbalance, length.

Writes ``results/validity_<name>.md`` (and ``.json``).

    python -m research.parentheses.validity --name default
    python -m research.parentheses.validity --errors 47 49 37 34 --name errors_baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from recipes.parentheses.data import count_imbalance, min_prefix_depth
from recipes.parentheses.model import answers
from recipes.parentheses.stats import fisher_exact
from research.parentheses.configs import RESULTS
from research.parentheses.direction_check import BASE, baseline_cli, causal_run

BAR = 0.99
NESTED_END = 0.9
SCORE_BINS = ((0.0, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 0.95), (0.95, 1.0))
EXCLUDED = ("open_choice", "steps1400", "flipped", "close_heavy", "causal_last", "screen")


@dataclass(frozen=True)
class Run:
    """A finished training run: seed, final nested score and accuracy, whether it was re-weighted."""

    seed: int
    nested_score: float
    accuracy: float
    reweighted: bool


def _run(seed: object, metrics: dict, reweighted: bool) -> Run:
    score, accuracy = (round(float(metrics[key]), 6) for key in ("nested_score", "accuracy"))
    return Run(int(seed), score, accuracy, reweighted)


def default_config_runs(results: Path = RESULTS) -> list[Run]:
    """The distinct default-configuration runs recorded in ``results`` (files named with any of
    ``EXCLUDED`` are other configurations or schedules and left out)."""
    runs: list[Run] = []
    for path in sorted(results.glob("sweep_default*.csv")):
        if not any(word in path.name for word in EXCLUDED):
            with path.open() as f:
                runs += [_run(row["seed"], row, row["arm"] != "baseline") for row in csv.DictReader(f)]
    for path in sorted(results.glob("direction_check_*.json")):
        if not any(word in path.name for word in EXCLUDED):
            runs += [_run(row["seed"], row, True) for row in json.loads(path.read_text()).get("runs", [])]
    for path in sorted(results.glob("response_map_*.json")):
        for pair in json.loads(path.read_text())["pairs"]:
            runs += [_run(pair["seed"], pair[side], True) for side in ("plus", "minus")]
    return list(dict.fromkeys(runs))


def in_bin(score: float, low: float, high: float) -> bool:
    """``low ≤ score < high``; the top bin (``high`` = 1) includes 1."""
    return low <= score < high or score == high == 1.0


def failures(runs: list[Run]) -> tuple[int, int]:
    """``(runs below the bar, runs)``."""
    return sum(run.accuracy < BAR for run in runs), len(runs)


def pooled_table(runs: list[Run]) -> str:
    """Markdown: runs below 99 % accuracy per nested-score bin, natural and re-weighted; Fisher tests."""
    lines = [
        "| nested score | natural weights: below 99 % / runs | re-weighted: below 99 % / runs |",
        "|---|---:|---:|",
    ]
    for low, high in SCORE_BINS:
        cells = []
        for reweighted in (False, True):
            chosen = [r for r in runs if r.reweighted == reweighted and in_bin(r.nested_score, low, high)]
            bad, total = failures(chosen)
            cells.append(f"{bad} / {total}")
        lines.append(f"| {low:.2f}–{high:.2f} | " + " | ".join(cells) + " |")
    nested = [r for r in runs if r.nested_score >= NESTED_END]
    rest = [r for r in runs if r.nested_score < NESTED_END]
    (bad_n, n_n), (bad_r, n_r) = failures(nested), failures(rest)
    natural = failures([r for r in nested if not r.reweighted])
    reweighted = failures([r for r in nested if r.reweighted])
    p_score = fisher_exact(bad_n, n_n - bad_n, bad_r, n_r - bad_r)
    p_weights = fisher_exact(
        natural[0], natural[1] - natural[0], reweighted[0], reweighted[1] - reweighted[0]
    )
    lines += [
        "",
        f"- {len(runs)} distinct runs. Score ≥ {NESTED_END}: {bad_n} of {n_n} below 99 %; "
        f"score < {NESTED_END}: {bad_r} of {n_r} (Fisher exact p = {p_score:.2g}).",
        f"- Score ≥ {NESTED_END}, natural weights {natural[0]} of {natural[1]}, "
        f"re-weighted {reweighted[0]} of {reweighted[1]} (Fisher exact p = {p_weights:.2g}).",
    ]
    return "\n".join(lines)


def error_kind(text: str, label: int) -> tuple[str, str, int, str]:
    """The kind of a string ``text`` with ``label``: ``(label, "dips" | "never dips", |count imbalance|,
    length bucket 2–8 / 10–14 / 16–20)``."""
    bucket = "2–8" if len(text) <= 8 else "10–14" if len(text) <= 14 else "16–20"
    dips = "dips" if min_prefix_depth(text) < 0 else "never dips"
    return ("TRUE" if label else "FALSE", dips, abs(count_imbalance(text)), bucket)


def error_kinds(seed: int) -> tuple[dict, Counter]:
    """Train the baseline run of ``seed``; its final metrics and its in-distribution errors by
    :func:`error_kind`."""
    cli = baseline_cli(BASE, seed)
    metrics = causal_run(cli, seed, 0)
    val = cli.datamodule.datamodule.val_set
    strings = val.strings
    wrong = (answers(cli.model, val.tokens) != val.labels).nonzero().flatten().tolist()
    return metrics, Counter(error_kind(strings[i], int(val.labels[i])) for i in wrong)


def errors_table(results: list[tuple[dict, Counter]]) -> str:
    """Markdown: each seed's accuracy, nested score and its errors by kind of string."""
    lines = [
        "| seed | accuracy | nested score | errors by kind (label, dip, imbalance, length): count |",
        "|---:|---:|---:|---|",
    ]
    for metrics, kinds in results:
        listed = "; ".join(
            f"{label} {dip} {imbalance} {length}: {count}"
            for (label, dip, imbalance, length), count in kinds.most_common()
        )
        lines.append(
            f"| {metrics['seed']} | {metrics['accuracy']:.4f} | {metrics['nested_score']:.3f} "
            f"| {listed or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True, help="results/validity_<name>.md and .json")
    parser.add_argument(
        "--errors", type=int, nargs="+", help="instead: retrain these baseline seeds and count their errors"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m research.parentheses.validity " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.errors:
        results = [error_kinds(seed) for seed in args.errors]
        table = errors_table(results)
        data: object = [{"metrics": m, "errors": [[*k, c] for k, c in kinds.items()]} for m, kinds in results]
    else:
        runs = default_config_runs()
        table = pooled_table(runs)
        data = [asdict(run) for run in runs]
    out = RESULTS / f"validity_{args.name}"
    out.with_suffix(".json").write_text(json.dumps({"command": command, "data": data}))
    out.with_suffix(".md").write_text(f"Command: `{command}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
