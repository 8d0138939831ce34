"""A sweep's tables and figure: nested score per arm, paired tests against the baseline, mirror arms."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recipes.parentheses.stats import PURE_NESTED, nested_counts_fisher, t_interval, wilcoxon_signed_rank

Row = dict[str, object]


def arm_order(rows: Sequence[Row], order: Sequence[str] | None = None) -> list[str]:
    """The arms present: in ``order`` if given, else baseline first and the rest as they appear."""
    present = list(dict.fromkeys(str(r["arm"]) for r in rows))
    if order is not None:
        return [a for a in order if a in present]
    return sorted(present, key=lambda a: a != "baseline")


def mirror(arm: str) -> str:
    """The arm aimed the other way: ``…nested…`` ↔ ``…equal…``, else ``<arm>_equal``."""
    return arm.replace("nested", "equal") if "nested" in arm else f"{arm}_equal"


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def summarize(rows: Sequence[Row], nested_above: float, order: Sequence[str] | None = None) -> str:
    """Markdown: per-arm table (seeds above ``PURE_NESTED`` counted as NESTED), paired differences against
    the baseline (NESTED above ``nested_above`` in the Fisher test), the two directions of a route against
    each other, and what the weights favour."""
    arms = arm_order(rows, order)
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
        hybrid = len(rs) - nested - equal
        t = statistics.mean(r["seconds"] for r in rs)
        out.append(
            f"| {a} | {len(rs)} | {_ms(ns)} | {_ms([r['nested_score_interior'] for r in rs])} | "
            f"{min(acc):.4f} | {statistics.mean(acc):.4f} | {nested} / {equal} / {hybrid} | "
            f"{t:.1f} | {t / base_time:.2f}× |"
        )
    if "baseline" in by:
        out += [
            "",
            "Paired differences vs baseline (same seeds): nested score of the arm − baseline's; 95 % "
            "t-interval; two-sided exact Wilcoxon signed-rank p (exact enumeration, zeros dropped); "
            f"Fisher exact p on (#NESTED vs not) between arm and baseline, NESTED = score > {nested_above}.",
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
    pairs = [(a, mirror(a)) for a in arms if a != "baseline" and "equal" not in a and mirror(a) in by]
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


def favour_table(rows: Sequence[Row], arms: list[str]) -> str:
    """Final mass / natural mass, averaged over seeds and pooled (plain mean) over length buckets."""
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
            for k, v in json.loads(str(r["favour"])).items():
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


def plot_scores(rows: Sequence[Row], path: Path, order: Sequence[str] | None = None) -> Path:
    """Nested score of every run per arm (dots, one per seed; a bar at the mean), with seeds joined
    across arms by thin lines so the pairing shows. Written as a PNG."""
    arms = arm_order(rows, order)
    figure = Figure(figsize=(1.8 + 1.5 * len(arms), 3.8))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    seeds = sorted({int(r["seed"]) for r in rows})
    score = {(str(r["arm"]), int(r["seed"])): float(r["nested_score"]) for r in rows}
    for seed in seeds:
        xs = [i for i, a in enumerate(arms) if (a, seed) in score]
        axis.plot(xs, [score[(arms[i], seed)] for i in xs], color="0.8", lw=0.7, zorder=1)
    for i, a in enumerate(arms):
        ys = [score[(a, s)] for s in seeds if (a, s) in score]
        axis.scatter([i] * len(ys), ys, s=18, alpha=0.8, zorder=2)
        axis.hlines(statistics.mean(ys), i - 0.3, i + 0.3, color="k", zorder=3)
    axis.set_xticks(range(len(arms)), arms, rotation=15)
    axis.set_xlim(-0.5, len(arms) - 0.5)
    axis.set_ylim(-0.03, 1.03)
    axis.set_ylabel("nested score (OOD answered FALSE)")
    axis.axhline(0.5, color="grey", lw=0.5, ls="--")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
