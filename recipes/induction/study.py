"""The induction study: arms × paired seeds, each run the recipe's LightningCLI run, then a table and a
figure of the in-context score against step per arm.

Every (arm, seed) run is, in this process,

    python -m recipes.induction fit --config configs/base.yaml [--config configs/arms/ARM.yaml] \\
        --seed_everything SEED --results OUT/runs/ARM/seedSEED.json

(``baseline`` has no overlay; TensorBoard logs under ``--logs``/ARM/seedSEED). The seed sets the model's
initialization and the batch order; the training windows and probes are the same in every run, so the arms
are paired by seed. Runs go seed by seed (every arm of a seed before the next seed), one at a time; a run
whose JSON exists is not repeated, so an interrupted study resumes where it stopped.

Writes ``OUT/onsets.csv`` (one row per run: onset step per probe with its censoring flag, final metrics,
wall seconds) and ``OUT/in_context.png`` (``plot_in_context``).

Usage:

    python -m recipes.induction.study --quick                    # seeds 1000-1001, quick.yaml
    python -m recipes.induction.study --arms baseline --seeds 0-15 --out runs/induction
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from recipes.induction.metrics import Onset, find_onset

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"
PROBES = ("random", "natural")
COLUMNS = (
    "arm",
    "seed",
    "onset_random",
    "censored_random",
    "onset_natural",
    "censored_natural",
    "final_step",
    "final_val_loss",
    "final_icl_random",
    "final_icl_natural",
    "final_prefix_max",
    "final_prev_max",
    "wall_seconds",
    "cpu_seconds",
)


def parse_seeds(specs: Sequence[str]) -> list[int]:
    """Seeds from ``["0-3", "7"]`` → ``[0, 1, 2, 3, 7]`` (ranges inclusive)."""
    seeds: list[int] = []
    for spec in specs:
        low, _, high = spec.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be non-empty and distinct, got {list(specs)}")
    return seeds


def run_path(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}.json"


def cli_args(
    arm: str, seed: int, out: Path, logs: Path, configs: Sequence[Path], overrides: Sequence[str]
) -> list[str]:
    """The CLI arguments of one run (see the module docstring)."""
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    if arm != "baseline":
        args += ["--config", str(CONFIGS / "arms" / f"{arm}.yaml")]
    return [
        *args,
        f"--seed_everything={seed}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        f"--trainer.logger.init_args.name={arm}",
        f"--trainer.logger.init_args.version=seed{seed}",
        f"--results={run_path(out, arm, seed)}",
        *overrides,
    ]


def run_study(
    arms: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    logs: Path,
    configs: Sequence[Path],
    overrides: Sequence[str] = (),
) -> None:
    """Run every missing (arm, seed), seed by seed, one at a time, in this process."""
    from recipes.induction.__main__ import main

    for seed in seeds:
        for arm in arms:
            if run_path(out, arm, seed).exists():
                continue
            args = cli_args(arm, seed, out, logs, configs, overrides)
            print(f"[{arm} seed {seed}] python -m recipes.induction {' '.join(args)}", flush=True)
            main(args, save_config_callback=None)


def load_runs(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every run's report under ``OUT/runs``, by arm (runs sorted by seed)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((out / "runs").glob("*/seed*.json")):
        runs.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    return {arm: sorted(reports, key=lambda r: r["seed"]) for arm, reports in runs.items()}


def onsets(report: dict[str, Any], thresholds: dict[str, float] | None = None) -> dict[str, Onset]:
    """A run's onset per probe at ``thresholds`` (default: the run's own), from its history."""
    thresholds = thresholds or report["thresholds"]
    steps = [h["step"] for h in report["history"]]
    return {p: find_onset(steps, [h[f"icl/{p}"] for h in report["history"]], thresholds[p]) for p in PROBES}


def table_rows(
    runs: dict[str, list[dict[str, Any]]], thresholds: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """One row per run (``COLUMNS``), onsets at ``thresholds`` (default: each run's own)."""
    rows = []
    for arm, reports in runs.items():
        for r in reports:
            final, onset = r["final"], onsets(r, thresholds)
            rows.append(
                {
                    "arm": arm,
                    "seed": r["seed"],
                    "onset_random": onset["random"].step,
                    "censored_random": int(onset["random"].censored),
                    "onset_natural": onset["natural"].step,
                    "censored_natural": int(onset["natural"].censored),
                    "final_step": final["step"],
                    "final_val_loss": round(final["val/loss"], 5),
                    "final_icl_random": round(final["icl/random"], 4),
                    "final_icl_natural": round(final["icl/natural"], 4),
                    "final_prefix_max": round(final["heads/prefix_max"], 4),
                    "final_prev_max": round(final["heads/prev_max"], 4),
                    "wall_seconds": r["wall_seconds"],
                    "cpu_seconds": r.get("cpu_seconds", float("nan")),
                }
            )
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def curves(reports: Sequence[dict[str, Any]], key: str) -> tuple[list[int], torch.Tensor]:
    """The steps every report evaluated and the values of ``key`` there, ``[runs, steps]``."""
    common = sorted(set.intersection(*({h["step"] for h in r["history"]} for r in reports)))
    values = [[next(h[key] for h in r["history"] if h["step"] == s) for s in common] for r in reports]
    return common, torch.tensor(values, dtype=torch.float64)


def plot_in_context(
    runs: dict[str, list[dict[str, Any]]], path: Path, thresholds: dict[str, float] | None = None
) -> Figure:
    """The in-context score against step, one panel per probe: per arm the mean over seeds with a band of
    ± one standard error of that mean, each seed as a faint line, and the onset threshold dashed.

    Args:
        runs: reports by arm (``load_runs``).
        path: where the PNG goes.
        thresholds: onset threshold per probe (default: the first report's).
    """
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    if thresholds is None:
        thresholds = next(iter(runs.values()))[0]["thresholds"]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, len(PROBES), sharex=True)
    colors = ["tab:gray", "tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"]
    for axis, probe in zip(axes, PROBES, strict=True):
        for i, (arm, reports) in enumerate(runs.items()):
            color = colors[i % len(colors)]
            steps, values = curves(reports, f"icl/{probe}")
            for row in values:
                axis.plot(steps, row.tolist(), color=color, alpha=0.18, linewidth=0.7)
            mean = values.mean(0)
            n = len(reports)
            sem = values.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(mean)
            axis.plot(
                steps, mean.tolist(), color=color, linewidth=2, label=f"{arm}: mean ± s.e.m. of {n} seeds"
            )
            axis.fill_between(steps, (mean - sem).tolist(), (mean + sem).tolist(), color=color, alpha=0.25)
        if probe in thresholds and math.isfinite(thresholds[probe]):
            axis.axhline(
                thresholds[probe], color="black", linestyle="--", linewidth=1, label="onset threshold"
            )
        what = (
            "repeated random printable sequences" if probe == "random" else "repeated natural-text segments"
        )
        axis.set_title(f"in-context score, {what}")
        axis.set_xlabel("training step")
        axis.set_ylabel("loss 2nd copy − loss 1st copy (nats)")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return figure


def report(out: Path, thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Write ``onsets.csv`` and ``in_context.png`` from the runs under ``out`` (onsets at ``thresholds``,
    default each run's own); return the rows."""
    runs = load_runs(out)
    rows = table_rows(runs, thresholds)
    write_table(rows, out / "onsets.csv")
    if runs:
        plot_in_context(runs, out / "in_context.png", thresholds)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arms", nargs="+", default=["baseline"], help="baseline, or overlays in configs/arms/"
    )
    parser.add_argument("--seeds", nargs="+", help="e.g. 0-15, or 3 5 7 (default 0-15; --quick: 1000 1001)")
    parser.add_argument("--out", type=Path, default=Path("runs/induction"), help="results directory")
    parser.add_argument("--logs", type=Path, default=Path("lightning_logs/induction_study"))
    parser.add_argument("--config", type=Path, nargs="+", default=[CONFIGS / "base.yaml"])
    parser.add_argument("--quick", action="store_true", help="2 seeds (exploratory 1000-1001), quick.yaml")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table and the figure")
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs=2,
        metavar=("RANDOM", "NATURAL"),
        help="onset thresholds of the table",
    )
    parser.add_argument("--threads", type=int, default=int(os.environ.get("INDUCTION_THREADS", "1")))
    args, overrides = parser.parse_known_args(argv)  # the rest go to the CLI, e.g. --trainer.max_steps=3000
    torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds or (["1000-1001"] if args.quick else ["0-15"]))
    configs = list(args.config)
    if args.quick:
        seeds, configs = seeds[:2], [*configs, CONFIGS / "quick.yaml"]
    if not args.report_only:
        run_study(args.arms, seeds, args.out, args.logs, configs, overrides)
    thresholds = dict(zip(PROBES, args.thresholds, strict=True)) if args.thresholds else None
    for row in report(args.out, thresholds):
        print(", ".join(f"{k} {row[k]}" for k in COLUMNS))


if __name__ == "__main__":
    main()
