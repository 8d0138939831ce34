"""Baseline study: train one configuration on several seeds and tabulate which rule each seed learned.

For each seed ``s`` (model initialization and batch order; the data seed stays the one in the config)
this trains through the recipe's ``LightningCLI`` exactly as

    python -m recipes.parentheses fit --config CONFIG --seed_everything s [OVERRIDES]

(without logger, checkpoints or validation), then measures the in-distribution accuracy and the nested
score on the config's OOD test set, split by how far the OOD strings dip below zero (min prefix depth −1
vs ≤ −2) and by whether they start with ``")"`` or end with ``"("`` (boundary) or not (interior).

Results go to ``research/parentheses/results/baseline_<name>.csv`` (one row per seed, rewritten after
every seed) and ``.md`` (the command, the resolved configuration, the per-seed table and a summary).

Usage:

    python -m research.parentheses.study_baseline --config baseline \
        --seeds 16 [--name NAME] [--set model.d_model=32 --set data.n_train=5000 ...]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from recipes.parentheses.cli import main as cli_main
from recipes.parentheses.sweep import bare_argv
from research.parentheses.configs import RESULTS, config_args, config_name

COLUMNS = (
    "seed",
    "accuracy",
    "nested_score",
    "nested_score_dip1",
    "nested_score_dip2plus",
    "nested_score_boundary",
    "nested_score_interior",
    "seconds",
    "cpu_seconds",
)
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.limit_val_batches=0",
]


def train_seed(config: str, seed: int, overrides: list[str]) -> dict[str, float]:
    """Train one seed through the CLI and return its final metrics plus ``seed`` and ``seconds``."""
    args = ["fit", *config_args(config), "--seed_everything", str(seed), *QUIET, *overrides]
    start, cpu_start = time.perf_counter(), time.process_time()
    with bare_argv():
        cli = cli_main(args, save_config_callback=None)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seed": seed, **cli.final_metrics, "seconds": seconds, "cpu_seconds": cpu_seconds}


def resolved_config(config: str, overrides: list[str]) -> str:
    """The model/data/trainer settings the CLI resolves, as YAML (without running anything)."""
    with bare_argv():
        cli = cli_main([*config_args(config), *QUIET, *overrides], run=False, save_config_callback=None)
    data, model = cli.datamodule.hparams, cli.model.hparams
    lines = [f"max_steps: {cli.trainer.max_steps}", "model:"]
    lines += [f"  {k}: {v}" for k, v in model.items()]
    lines += ["data:"] + [f"  {k}: {v}" for k, v in data.items()]
    parameters = sum(p.numel() for p in cli.model.parameters())
    lines += [f"# parameters: {parameters}"]
    return "\n".join(lines)


def summary(rows: list[dict[str, float]], key: str) -> str:
    """``mean ± std [min, max]`` of ``key`` over rows (NaNs skipped)."""
    values = [r[key] for r in rows if not math.isnan(r[key])]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} [{min(values):.3f}, {max(values):.3f}]"


def histogram(values: list[float], bins: int = 10) -> str:
    """Counts of ``values`` in ``bins`` equal bins of [0, 1]."""
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int(v * bins))] += 1
    return " | ".join(f"{i / bins:.1f}–{(i + 1) / bins:.1f}: {c}" for i, c in enumerate(counts))


def write(rows: list[dict[str, float]], name: str, command: str, config_text: str) -> tuple[Path, Path]:
    """Write ``baseline_<name>.csv`` and ``.md``; returns their paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS / f"baseline_{name}.csv", RESULTS / f"baseline_{name}.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in COLUMNS})
    scores = [r["nested_score"] for r in rows]
    nested = sum(s > 0.5 for s in scores)
    lines = [
        f"# Parentheses baseline: `{name}`",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        "Resolved configuration (model seed = batch-order seed = the run's seed; the data are fixed):",
        "",
        "```yaml",
        config_text,
        "```",
        "",
        f"## Summary over {len(rows)} seeds",
        "",
        f"- in-distribution accuracy: {summary(rows, 'accuracy')}",
        f"- nested score: {summary(rows, 'nested_score')}",
        f"- nested score, OOD strings dipping to −1: {summary(rows, 'nested_score_dip1')}",
        f"- nested score, OOD strings dipping to ≤ −2: {summary(rows, 'nested_score_dip2plus')}",
        "- nested score, boundary OOD strings (start ')' or end '('): "
        f"{summary(rows, 'nested_score_boundary')}",
        f"- nested score, interior OOD strings: {summary(rows, 'nested_score_interior')}",
        f"- seeds NESTED (score > 0.5): {nested}; EQUAL-COUNT: {len(rows) - nested}; "
        f"score < 0.1: {sum(s < 0.1 for s in scores)}; score > 0.9: {sum(s > 0.9 for s in scores)}",
        f"- nested-score histogram: {histogram(scores)}",
        f"- seconds per run, wall (shared 2-core machine, 1 thread): {summary(rows, 'seconds')}",
        f"- seconds per run, CPU time of this process: {summary(rows, 'cpu_seconds')}",
        "",
        "## Per seed",
        "",
        "| seed | accuracy | nested | dip −1 | dip ≤ −2 | boundary | interior | wall s | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['accuracy']:.4f} | {r['nested_score']:.3f} | {r['nested_score_dip1']:.3f} | "
            f"{r['nested_score_dip2plus']:.3f} | {r['nested_score_boundary']:.3f} | "
            f"{r['nested_score_interior']:.3f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="a study configuration (configs.py) or a YAML path")
    parser.add_argument("--seeds", type=int, default=16, help="seeds 0 … N−1 (after --first-seed)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results name (default: the config's file stem)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a CLI override, e.g. model.d_model=32",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"--{item}" for item in args.set]
    name = args.name or config_name(args.config)
    command = "python -m research.parentheses.study_baseline " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    config_text = resolved_config(args.config, overrides)
    rows: list[dict[str, float]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rows.append(train_seed(args.config, seed, overrides))
        r = rows[-1]
        print(
            f"seed {seed}: accuracy {r['accuracy']:.4f} nested {r['nested_score']:.3f} "
            f"(dip1 {r['nested_score_dip1']:.3f}, dip2+ {r['nested_score_dip2plus']:.3f}, "
            f"boundary {r['nested_score_boundary']:.3f}, interior {r['nested_score_interior']:.3f}) "
            f"{r['seconds']:.1f}s wall, {r['cpu_seconds']:.1f}s CPU",
            flush=True,
        )
        csv_path, md_path = write(rows, name, command, config_text)
    print(f"wrote {os.path.relpath(csv_path)} and {os.path.relpath(md_path)}")
    return rows


if __name__ == "__main__":
    main()
