"""The demo (``make demo``, ``lightning-patterning demo``): patterning moves which algorithm a model learns.

Trains the parentheses recipe's default configuration from scratch on seeds 64, 65 and 66 (the first
three of the seeds that confirmed the result) in three arms — natural training weights, weights along
the shipped direction toward NESTED, and toward EQUAL-COUNT — plus one run of online patterning with the
LLC tracked, two runs at a time. Prints the nested score of every run and what moved, and writes a figure,
the sweep's tables, TensorBoard logs and a report (``lightning-patterning report``).

    python -m recipes.parentheses.demo [--out runs/demo] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_patterning.reporting import write_report
from recipes.parentheses.report import plot_scores
from recipes.parentheses.stats import PURE_NESTED
from recipes.parentheses.sweep import BASE, CONFIGS, run_jobs, write_csv, write_md

SEEDS = (64, 65, 66)
ARMS = ("equal", "baseline", "nested")
ONLINE = str(CONFIGS / "demo" / "online_llc.yaml")


def score_table(rows: Sequence[dict[str, object]]) -> str:
    """One line per arm: the nested score of each seed and their mean."""
    score = {(r["arm"], r["seed"]): float(r["nested_score"]) for r in rows}
    lines = [f"  {'arm':<10}" + "".join(f"{f'seed {s}':>9}" for s in SEEDS) + f"{'mean':>8}"]
    for arm in ARMS:
        values = [score[(arm, s)] for s in SEEDS]
        lines.append(
            f"  {arm:<10}" + "".join(f"{v:>9.3f}" for v in values) + f"{statistics.mean(values):>8.3f}"
        )
    return "\n".join(lines)


def summary(rows: Sequence[dict[str, object]], out: Path, report: Path, minutes: float) -> str:
    """What ran, what moved and where to look."""
    arm_rows = [r for r in rows if r["arm"] in ARMS]
    mean = {a: statistics.mean(float(r["nested_score"]) for r in arm_rows if r["arm"] == a) for a in ARMS}
    nested = {a: sum(float(r["nested_score"]) > PURE_NESTED for r in arm_rows if r["arm"] == a) for a in ARMS}
    accuracy = min(float(r["accuracy"]) for r in rows)
    seeds = ", ".join(map(str, SEEDS))
    counts = f"{nested['nested']} of {len(SEEDS)} seeds toward NESTED, {nested['baseline']} in the baseline, "
    counts += f"{nested['equal']} toward EQUAL-COUNT"
    shifts = f"toward NESTED {mean['nested'] - mean['baseline']:+.3f}, "
    shifts += f"toward EQUAL-COUNT {mean['equal'] - mean['baseline']:+.3f}"
    return f"""
lightning_patterning demo: patterning chooses which algorithm a transformer learns ({minutes:.1f} min)

What ran: a small transformer learns to tell balanced parenthesis strings from unbalanced ones. Two rules
fit its training data: NESTED (the true one) and EQUAL-COUNT (as many '(' as ')'). Seeds {seeds} were
trained from scratch three ways: natural training weights (baseline), and the training groups
re-weighted once, before training, along a direction measured with susceptibilities toward NESTED
(nested) or toward EQUAL-COUNT (equal). One more run re-weights online, re-estimating every 175 steps.

What moved: the nested score, the fraction of equal-count but unbalanced strings (never trained on) that
the model rejects: 1 = it learned NESTED, 0 = EQUAL-COUNT.
{score_table(arm_rows)}
  NESTED (> {PURE_NESTED}) on {counts}.
  Mean score against the baseline's {mean["baseline"]:.3f}: {shifts}.
  Every run classifies strings like its training data at >= {accuracy:.1%} accuracy.
  Three seeds show the effect, not its size. On 32 seeds: toward NESTED +0.150 [+0.057, +0.244],
  toward EQUAL-COUNT -0.099 [-0.191, -0.008] (docs/recipes/parentheses.md).

Where to look:
  figure       {out / "sweep_demo.png"}
  tables       {out / "sweep_demo.md"}
  report       {report} (and .html): the online run's LLC, susceptibilities, weights
  TensorBoard  tensorboard --logdir {out / "tensorboard"}
"""


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (spawned worker processes)")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "tensorboard"
    jobs = [(ONLINE, SEEDS[0])] + [(arm, seed) for seed in SEEDS for arm in ARMS]
    kwargs = dict(configs=[BASE], log_dir=str(logs))
    print(f"demo: {len(jobs)} training runs of ~35 s each on one core, {args.jobs} at a time", flush=True)
    rows = list(run_jobs(jobs, kwargs, threads=1, processes=args.jobs))
    rows.sort(key=lambda r: (r["seed"], str(r["arm"])))
    write_csv(rows, args.out / "sweep_demo.csv")
    write_md(rows, args.out / "sweep_demo.md", "python -m recipes.parentheses.demo", PURE_NESTED, args.jobs)
    plot_scores([r for r in rows if r["arm"] in ARMS], args.out / "sweep_demo.png", order=ARMS)
    report = write_report(logs, args.out / "report")
    print(summary(rows, args.out, report, (time.perf_counter() - start) / 60))
    return rows


if __name__ == "__main__":
    main()
