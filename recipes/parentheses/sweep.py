"""Patterning sweep: several arms on the same seeds, paired, with paired statistics.

Every (arm, seed) run is the recipe's LightningCLI run

    python -m recipes.parentheses fit --config BASE --config configs/arms/ARM.yaml --seed_everything SEED \\
        --trainer.logger.init_args.name parentheses/ARM --trainer.logger.init_args.version seedSEED

in this process (TensorBoard logs under ``lightning_logs/parentheses/<arm>/seed<k>``; no validation
during training unless ``--validate``). The seed sets the model initialization and the weighted draw, so
the arms share the init and the batch order until patterning first changes the weights. All arms,
baseline included, draw from ``lp.PatterningDataModule`` with the groups at their natural mass.

Arms (``configs/arms/``): ``baseline`` (no callback), ``online_nested`` / ``online_equal`` (online
patterning on the OOD-probe loss, target −1 / +1), ``online_nested_controlled`` /
``online_equal_controlled`` (the same with the Dyck-word control probe held fixed), ``llc_route``
(fixed weights from Δχ = χ(λ_NESTED) − χ(λ_EQUAL), target −1; ``llc_route_equal``: +1;
``--make-delta-chi`` builds the file first),
``reference_heuristic`` (``reference_heuristic_balanced``: each class kept at its natural mass),
``probe_oneoff`` / ``probe_oneoff_equal`` (one-off probe-loss patterning: fixed weights along the mean
step-150 controlled direction of ``direction_check_branch150_16seeds.json``, ±1.5; another configuration
names its own with ``--set sampling.direction=…``).

Writes ``<results-dir>/sweep_<name>.csv`` (default ``results/``; one row per run, rewritten after each
run; an existing CSV is resumed: runs already in it are skipped), ``.md`` (command, per-arm mean ± sd,
paired differences vs baseline with 95 % t-intervals and exact Wilcoxon signed-rank p-values, counts of
seeds per algorithm with Fisher exact p-values, overhead, what the weights favour, per-seed table) and
``.png`` (nested score per arm). Prints the summary at the end.

Usage:

    python -m recipes.parentheses.sweep --quick --jobs 2 --results-dir runs/parentheses-quick    # make demo
    python -m recipes.parentheses.sweep --seeds 16 --name default --arms baseline reference_heuristic \
        llc_route llc_route_equal online_nested online_equal online_nested_controlled online_equal_controlled
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch

from recipes.parentheses.cli import main as cli_main
from recipes.parentheses.patterning import (
    PURE_NESTED,
    group_masses,
    nested_counts_fisher,
    t_interval,
    wilcoxon_signed_rank,
)

HERE = Path(__file__).parent
DIRECTION_PAIRS = (
    ("online_nested", "online_equal"),
    ("online_nested_controlled", "online_equal_controlled"),
    ("llc_route", "llc_route_equal"),
    ("probe_oneoff", "probe_oneoff_equal"),
)
RESULTS = HERE / "results"
CONFIGS = HERE / "configs"
ARMS = (
    "baseline",
    "online_nested",
    "online_equal",
    "online_nested_controlled",
    "online_equal_controlled",
    "llc_route",
    "llc_route_equal",
    "reference_heuristic",
    "reference_heuristic_balanced",
    "probe_oneoff",
    "probe_oneoff_equal",
)
QUICK_ARMS = (
    "baseline",
    "reference_heuristic",
    "llc_route",
    "online_nested_controlled",
    "probe_oneoff",
    "probe_oneoff_equal",
)
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
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@contextlib.contextmanager
def _bare_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        yield
    finally:
        sys.argv = saved


def favour(data: object) -> dict[str, float]:
    """Final mass / natural mass of each group (``label:feature:length-bucket`` keys)."""
    inner = getattr(data, "datamodule", data)
    weights = getattr(data, "weights", None)
    natural = group_masses(inner, None)
    final = group_masses(inner, weights)
    return {f"{k[0]}:{k[1]}:{k[2]}": final[k] / natural[k] for k in natural}


def _run_job(
    base: str, overrides: list[str], validate: bool, threads: int, job: tuple[str, int]
) -> dict[str, object]:
    """``train_run`` for ``job = (arm, seed)`` with ``threads`` torch threads (also in a worker process)."""
    torch.set_num_threads(threads)
    return train_run(base, job[0], job[1], overrides, validate)


def delta_chi_path(base: str) -> Path:
    """The ``llc_route`` arm's Δχ file for the base config ``base``."""
    return RESULTS / f"delta_chi_{Path(base).stem}.json"


def train_run(base: str, arm: str, seed: int, overrides: list[str], validate: bool) -> dict[str, object]:
    """One (arm, seed) run through the CLI; its final metrics, wall time and group mass ratios."""
    if arm.startswith("llc_route"):  # the YAML names the baseline config's Δχ file; use the base config's own
        overrides = [f"--trainer.callbacks.init_args.susceptibilities={delta_chi_path(base)}", *overrides]
    log_name = "parentheses/" + (arm if Path(base).stem == "baseline" else f"{Path(base).stem}/{arm}")
    args = [
        "fit",
        "--config",
        base,
        "--config",
        str(CONFIGS / "arms" / f"{arm}.yaml"),
        "--seed_everything",
        str(seed),
        f"--trainer.logger.init_args.name={log_name}",
        f"--trainer.logger.init_args.version=seed{seed}",
        *QUIET,
        *([] if validate else ["--trainer.limit_val_batches=0"]),
        *overrides,
    ]
    start = time.perf_counter()
    with _bare_argv():
        cli = cli_main(args, save_config_callback=None)
    seconds = time.perf_counter() - start
    m = cli.final_metrics
    return {
        "arm": arm,
        "seed": seed,
        "nested_score": m["nested_score"],
        "nested_score_interior": m["nested_score_interior"],
        "nested_score_boundary": m["nested_score_boundary"],
        "accuracy": m["accuracy"],
        "seconds": seconds,
        "favour": json.dumps(favour(cli.datamodule)),
    }


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


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarize(rows: list[dict[str, object]], open_choice: bool) -> str:
    """Markdown summary: per-arm table, paired tests vs baseline, algorithm counts, weights favoured."""
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    by = {a: {r["seed"]: r for r in rows if r["arm"] == a} for a in arms}
    base_time = (
        statistics.mean(r["seconds"] for r in by["baseline"].values()) if "baseline" in by else math.nan
    )
    out = [
        "| arm | seeds | nested score mean ± sd | interior nested score | min accuracy | mean accuracy | "
        f"NESTED (>{PURE_NESTED}) / EQUAL (<0.1) / hybrid | wall s | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a in arms:
        rs = list(by[a].values())
        ns = [r["nested_score"] for r in rs]
        acc = [r["accuracy"] for r in rs]
        nested = sum(x > PURE_NESTED for x in ns)
        equal = sum(x < 0.1 for x in ns)
        t = statistics.mean(r["seconds"] for r in rs)
        out.append(
            f"| {a} | {len(rs)} | {_ms(ns)} | {_ms([r['nested_score_interior'] for r in rs])} | "
            f"{min(acc):.4f} | {statistics.mean(acc):.4f} | "
            f"{nested} / {equal} / {len(rs) - nested - equal} | "
            f"{t:.1f} | {t / base_time:.2f}× |"
        )
    if "baseline" in by:
        nested_above = PURE_NESTED if open_choice else 0.5  # a seed counts as NESTED above this score
        out += [
            "",
            "Paired differences vs baseline (same seeds): nested score of the arm − baseline's; 95 % "
            "t-interval; two-sided exact Wilcoxon signed-rank p (exact enumeration, zeros dropped); "
            f"Fisher exact p on (#NESTED vs not) between arm and baseline, NESTED = score > {nested_above}"
            + (" (open-choice config: pure NESTED)" if open_choice else "")
            + ".",
            "",
            "| arm vs baseline | pairs | mean diff [95 % CI] | Wilcoxon W+ | Wilcoxon p | "
            f"NESTED>{nested_above} arm/base | Fisher p |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for a in arms:
            if a == "baseline":
                continue
            seeds = sorted(set(by[a]) & set(by["baseline"]))
            if not seeds:
                continue
            diffs = [by[a][s]["nested_score"] - by["baseline"][s]["nested_score"] for s in seeds]
            mean, low, high = t_interval(diffs)
            w, p = wilcoxon_signed_rank(diffs)
            na, nb, fp = nested_counts_fisher(
                [by[a][s]["nested_score"] for s in seeds],
                [by["baseline"][s]["nested_score"] for s in seeds],
                nested_above,
            )
            out.append(
                f"| {a} | {len(seeds)} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | {w:g} | {p:.4f} | "
                f"{na}/{len(seeds)} vs {nb}/{len(seeds)} | {fp:.4f} |"
            )
    pairs = [(n, e) for n, e in DIRECTION_PAIRS if n in by and e in by]
    if pairs:
        out += [
            "",
            "The two directions of one route against each other (same seeds): arm aimed at NESTED − arm "
            "aimed at EQUAL-COUNT; 95 % t-interval, exact Wilcoxon p.",
            "",
            "| toward NESTED − toward EQUAL-COUNT | pairs | mean diff [95 % CI] | Wilcoxon p |",
            "|---|---:|---:|---:|",
        ]
        for n, e in pairs:
            seeds = sorted(set(by[n]) & set(by[e]))
            diffs = [by[n][s]["nested_score"] - by[e][s]["nested_score"] for s in seeds]
            mean, low, high = t_interval(diffs)
            out.append(
                f"| {n} − {e} | {len(seeds)} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | "
                f"{wilcoxon_signed_rank(diffs)[1]:.4f} |"
            )
    out += ["", favour_table(rows, arms)]
    return "\n".join(out)


def favour_table(rows: list[dict[str, object]], arms: list[str]) -> str:
    """Final mass / natural mass, averaged over seeds and pooled (mass-weighted) over length buckets."""
    lines = [
        "What the final weights favour: mass / natural mass (1 = unchanged), mean over seeds, by max depth "
        "(TRUE strings) and by count imbalance (FALSE strings); pooled over length buckets (plain mean).",
        "",
    ]
    keys: dict[str, list[str]] = {}
    tables: dict[str, dict[str, float]] = {}
    for a in arms:
        ratios: dict[str, list[float]] = {}
        for r in rows:
            if r["arm"] != a:
                continue
            pooled: dict[str, list[float]] = {}
            for k, v in json.loads(r["favour"]).items():
                label, feature, _ = k.split(":")
                name = f"TRUE depth={feature}" if label == "1" else f"FALSE imbalance={feature}"
                pooled.setdefault(name, []).append(v)
            for name, vs in pooled.items():
                ratios.setdefault(name, []).append(statistics.mean(vs))
        tables[a] = {k: statistics.mean(v) for k, v in ratios.items()}
        for k in ratios:
            keys.setdefault(k, [])
    names = sorted(keys, key=lambda k: (k.startswith("FALSE"), int(k.split("=")[1])))
    lines.append("| group | " + " | ".join(arms) + " |")
    lines.append("|---|" + "---:|" * len(arms))
    for k in names:
        lines.append(f"| {k} | " + " | ".join(f"{tables[a].get(k, math.nan):.2f}" for a in arms) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(arms), 3.6))
    for i, a in enumerate(arms):
        ys = [r["nested_score"] for r in rows if r["arm"] == a]
        xs = [i + 0.12 * ((j % 5) - 2) / 2 for j in range(len(ys))]
        ax.scatter(xs, ys, s=14, alpha=0.7)
        ax.hlines(statistics.mean(ys), i - 0.3, i + 0.3, color="k")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("nested score (OOD answered FALSE)")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_md(
    rows: list[dict[str, object]], path: Path, command: str, open_choice: bool, jobs: int = 1
) -> str:
    summary = summarize(rows, open_choice)
    per_seed = [
        "| arm | seed | nested score | interior | boundary | accuracy | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], ARMS.index(r["arm"]))):
        per_seed.append(
            f"| {r['arm']} | {r['seed']} | {r['nested_score']:.3f} | {r['nested_score_interior']:.3f} | "
            f"{r['nested_score_boundary']:.3f} | {r['accuracy']:.4f} | {r['seconds']:.1f} |"
        )
    text = (
        f"# Patterning sweep `{path.stem}`\n\nCommand:\n\n    {command}\n\n"
        f"Machine: shared 2-core CPU, torch threads {torch.get_num_threads()}; wall s is per run "
        f"({jobs} run(s) at a time) and includes the patterning estimates.\n\n"
        f"{summary}\n\n![nested score per arm]({path.stem}.png)\n\n## Per seed\n\n"
        + "\n".join(per_seed)
        + "\n"
    )
    path.write_text(text)
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIGS / "baseline.yaml"), help="base config")
    parser.add_argument(
        "--arms", nargs="+", default=["baseline", "online_nested", "online_equal"], choices=ARMS
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … N−1 (or --seed-list)")
    parser.add_argument("--seed-list", type=int, nargs="+")
    parser.add_argument("--name", default=None, help="<results-dir>/sweep_<name>.*")
    parser.add_argument(
        "--quick", action="store_true", help=f"the main job: seeds 0-2 × {' / '.join(QUICK_ARMS)}"
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where sweep_<name>.csv/.md/.png go (default: %(default)s)",
    )
    parser.add_argument("--validate", action="store_true", help="validate every val_check_interval")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, in spawned worker processes")
    parser.add_argument("--make-delta-chi", action="store_true", help="build the llc_route Δχ file first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="CLI override")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    if args.quick:
        args.arms, args.seeds, args.seed_list = list(QUICK_ARMS), 3, None
    seeds = args.seed_list or list(range(args.seeds))
    name = args.name or ("quick" if args.quick else Path(args.config).stem)
    open_choice = "open_choice" in Path(args.config).stem
    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.results_dir / f"sweep_{name}.csv", args.results_dir / f"sweep_{name}.md"
    command = "python -m recipes.parentheses.sweep " + shlex.join(argv if argv is not None else sys.argv[1:])
    uses_delta_chi = any(a.startswith("llc_route") for a in args.arms)
    if args.make_delta_chi or (uses_delta_chi and not delta_chi_path(args.config).exists()):
        from recipes.parentheses.llc_route import make_delta_chi

        make_delta_chi(args.config, delta_chi_path(args.config))
    rows = read_rows(csv_path)
    done = {(r["arm"], r["seed"]) for r in rows}
    overrides = [f"--{kv}" for kv in args.set]
    todo = [(arm, seed) for seed in seeds for arm in args.arms if (arm, seed) not in done]
    runs = (partial(_run_job, args.config, overrides, args.validate, args.threads, job) for job in todo)
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:  # spawned workers (no forked torch state); they inherit PYTHONWARNINGS
            pool = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")))
            # On an error, drop the queued runs instead of finishing them all before the error surfaces.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = (f.result() for f in as_completed([pool.submit(run) for run in runs]))
        else:
            results = (run() for run in runs)
        for row in results:
            rows.append(row)
            print(
                f"[sweep] {row['arm']:>20} seed {row['seed']:>2}: nested {row['nested_score']:.3f}, "
                f"accuracy {row['accuracy']:.4f}, {row['seconds']:.1f} s",
                flush=True,
            )
            write_csv(rows, csv_path)
            write_md(rows, md_path, command, open_choice, args.jobs)
    summary = write_md(rows, md_path, command, open_choice, args.jobs)
    plot(rows, md_path.with_suffix(".png"))
    print(summary)
    print(f"\nwrote {csv_path}, {md_path} and {md_path.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
