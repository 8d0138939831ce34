"""Arms over paired seeds: each (arm, seed) run is the recipe's LightningCLI run

    python -m recipes.parentheses fit --config configs/base.yaml [--config VARIANT] --config ARM.yaml \\
        --seed_everything SEED

in this process (TensorBoard logs under ``<log-dir>/<arm>/seed<k>``). The seed sets the model's
initialization and the weighted draw, so the arms share both until their weights differ. An arm is a name
in ``configs/arms/`` (``baseline``, ``nested``, ``equal``, ``online_nested``, ``online_equal``) or the path
of any arm overlay.

Writes ``<results-dir>/sweep_<name>.csv`` (one row per run; an existing CSV is resumed: runs already in it
are skipped), ``.md`` (the command, per-arm mean ± sd, paired differences against the baseline with 95 %
t-intervals and exact Wilcoxon p, pure-NESTED seed counts with Fisher p, what the weights favour, per-seed
rows) and ``.png`` (nested score per arm), and prints the summary.

    python -m recipes.parentheses.sweep --arms baseline nested equal --seed-list 64 65 66 --jobs 2
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch

from recipes.parentheses.cli import main as cli_main
from recipes.parentheses.patterning import group_masses
from recipes.parentheses.report import plot_scores, summarize

HERE = Path(__file__).parent
CONFIGS = HERE / "configs"
BASE = str(CONFIGS / "base.yaml")
COLUMNS = (
    "arm",
    "seed",
    "nested_score",
    "nested_score_interior",
    "nested_score_boundary",
    "accuracy",
    "seconds",
    "favour",
)
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@contextlib.contextmanager
def bare_argv() -> Iterator[None]:
    """Hide this script's own arguments from LightningCLI (it reads ``sys.argv`` for its help text)."""
    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        yield
    finally:
        sys.argv = saved


def arm_path(arm: str) -> Path:
    """``configs/arms/<arm>.yaml``, or ``arm`` itself when it is the path of a YAML file."""
    path = Path(arm)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"arm overlay {arm!r} does not exist")
        return path
    path = CONFIGS / "arms" / f"{arm}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "arms").glob("*.yaml"))
        raise ValueError(f"unknown arm {arm!r}: give one of {known} or the path of an arm overlay")
    return path


def arm_name(arm: str) -> str:
    return Path(arm).stem


def favour(data: object) -> dict[str, float]:
    """Final mass / natural mass of each group (``label:feature:length-bucket`` keys)."""
    inner = getattr(data, "datamodule", data)
    weights = getattr(data, "weights", None)
    natural = group_masses(inner, None)
    final = group_masses(inner, weights)
    return {f"{k[0]}:{k[1]}:{k[2]}": final[k] / natural[k] for k in natural}


def train_run(
    configs: Sequence[str],
    arm: str,
    seed: int,
    overrides: Sequence[str] = (),
    validate: bool = False,
    log_dir: str = "lightning_logs/parentheses",
) -> dict[str, object]:
    """One (arm, seed) run through the CLI: its final metrics, wall time and group mass ratios."""
    args = ["fit"]
    for config in [*configs, str(arm_path(arm))]:
        args += ["--config", config]
    args += [
        "--seed_everything",
        str(seed),
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--trainer.logger.init_args.name={arm_name(arm)}",
        f"--trainer.logger.init_args.version=seed{seed}",
        *QUIET,
        *([] if validate else ["--trainer.limit_val_batches=0"]),
        *overrides,
    ]
    start = time.perf_counter()
    with bare_argv():
        cli = cli_main(args, save_config_callback=None)
    seconds = time.perf_counter() - start
    m = cli.final_metrics
    return {
        "arm": arm_name(arm),
        "seed": seed,
        "nested_score": m["nested_score"],
        "nested_score_interior": m["nested_score_interior"],
        "nested_score_boundary": m["nested_score_boundary"],
        "accuracy": m["accuracy"],
        "seconds": seconds,
        "favour": json.dumps(favour(cli.datamodule)),
    }


def _run_job(threads: int, kwargs: dict, job: tuple[str, int]) -> dict[str, object]:
    """``train_run`` for ``job = (arm, seed)`` with ``threads`` torch threads (also in a worker process)."""
    torch.set_num_threads(threads)
    return train_run(arm=job[0], seed=job[1], **kwargs)


def run_jobs(
    jobs: Sequence[tuple[str, int]], kwargs: dict, threads: int = 1, processes: int = 1
) -> Iterator[dict[str, object]]:
    """Run ``train_run(arm=…, seed=…, **kwargs)`` for every ``(arm, seed)``, ``processes`` at a time (spawned
    workers when more than one), yielding each row as it finishes and printing a line for it."""
    runs = [partial(_run_job, threads, kwargs, job) for job in jobs]
    with contextlib.ExitStack() as stack:
        if processes > 1:  # spawned workers (no forked torch state); they inherit PYTHONWARNINGS
            pool = stack.enter_context(ProcessPoolExecutor(processes, mp_context=get_context("spawn")))
            # On an error, drop the queued runs instead of finishing them all before the error surfaces.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = (f.result() for f in as_completed([pool.submit(run) for run in runs]))
        else:
            results = (run() for run in runs)
        for row in results:
            print(
                f"[sweep] {row['arm']:>14} seed {row['seed']:>2}: nested score {row['nested_score']:.3f}, "
                f"accuracy {row['accuracy']:.4f}, {row['seconds']:.1f} s",
                flush=True,
            )
            yield row


def read_rows(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seed"] = int(row["seed"])
        for key in COLUMNS[2:7]:
            row[key] = float(row[key])
    return rows


def write_csv(rows: list[dict[str, object]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_md(rows: list[dict[str, object]], path: Path, command: str, nested_above: float, jobs: int) -> str:
    """The sweep's Markdown report; returns its summary tables."""
    summary = summarize(rows, nested_above)
    arms = list(dict.fromkeys(str(r["arm"]) for r in rows))
    per_seed = [
        "| arm | seed | nested score | interior | boundary | accuracy | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], arms.index(str(r["arm"])))):
        per_seed.append(
            f"| {r['arm']} | {r['seed']} | {r['nested_score']:.3f} | {r['nested_score_interior']:.3f} | "
            f"{r['nested_score_boundary']:.3f} | {r['accuracy']:.4f} | {r['seconds']:.1f} |"
        )
    text = (
        f"# Patterning sweep `{path.stem}`\n\nCommand:\n\n    {command}\n\n"
        f"torch threads {torch.get_num_threads()}; wall s is per run ({jobs} run(s) at a time).\n\n"
        f"{summary}\n\n![nested score per arm]({path.stem}.png)\n\n## Per seed\n\n"
        + "\n".join(per_seed)
        + "\n"
    )
    path.write_text(text)
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        action="append",
        help=f"base config, then overlays (repeat the flag); default {BASE}",
    )
    parser.add_argument("--arms", nargs="+", default=["baseline", "nested", "equal"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (or --seed-list)")
    parser.add_argument("--seed-list", type=int, nargs="+")
    parser.add_argument("--name", default="sweep", help="<results-dir>/sweep_<name>.*")
    parser.add_argument("--results-dir", type=Path, default=Path("runs/parentheses"))
    parser.add_argument("--log-dir", default="lightning_logs/parentheses", help="TensorBoard logs")
    parser.add_argument(
        "--nested-above", type=float, default=0.9, help="a seed counts as NESTED above this nested score"
    )
    parser.add_argument("--validate", action="store_true", help="validate every val_check_interval")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, in spawned worker processes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="CLI override")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    for arm in args.arms:
        try:
            arm_path(arm)
        except (ValueError, FileNotFoundError) as error:
            parser.error(str(error))
    args.config = args.config or [BASE]
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    seeds = args.seed_list or list(range(args.seeds))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = (
        args.results_dir / f"sweep_{args.name}.csv",
        args.results_dir / f"sweep_{args.name}.md",
    )
    command = "python -m recipes.parentheses.sweep " + shlex.join(argv if argv is not None else sys.argv[1:])
    rows = read_rows(csv_path)
    done = {(r["arm"], r["seed"]) for r in rows}
    todo = [(arm, seed) for seed in seeds for arm in args.arms if (arm_name(arm), seed) not in done]
    kwargs = dict(
        configs=args.config,
        overrides=[f"--{kv}" for kv in args.set],
        validate=args.validate,
        log_dir=args.log_dir,
    )
    for row in run_jobs(todo, kwargs, args.threads, args.jobs):
        rows.append(row)
        write_csv(rows, csv_path)
    summary = write_md(rows, md_path, command, args.nested_above, args.jobs)
    plot_scores(rows, md_path.with_suffix(".png"))
    print(summary)
    print(f"\nwrote {csv_path}, {md_path} and {md_path.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
