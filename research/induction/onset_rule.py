"""From exploratory baseline curves: where the in-context score drops, the onset threshold that follows,
each run's onset at it (both probes), and the precursor state at candidate checkpoints for χ.

For each run and probe (the in-context score ``s_k`` at evaluations ``t_k``, every 50 steps):

* the sharp drop ends at the evaluation ``k*`` with the largest fall over ``WINDOW`` evaluations,
  ``s_{k*} − s_{k*−WINDOW}`` most negative;
* the level before it is the median of ``s`` over the ``SPAN`` evaluations ending at ``k* − WINDOW``; the
  level after, the median over the ``SPAN`` evaluations from ``k*`` on;
* the midpoint of the drop is ``(before + after) / 2``.

The proposed threshold of a probe is the mean midpoint over runs, rounded (to 0.5 nats for the random
probe, 0.1 for the natural one). The script then finds every run's onset at that threshold and at its
neighbours (``recipes.induction.metrics.find_onset``: the first evaluation below it, censored if none), and
the metrics at checkpoints that are fixed fractions of the median onset.

    python -m research.induction.onset_rule research/induction/results/exploratory_baseline

Writes ``onset_rule.md`` and ``onset_rule.json`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from recipes.induction.metrics import find_onset
from recipes.induction.study import load_runs

WINDOW = 4
"""Evaluations over which the fall is measured (200 steps: the drop takes about 150)."""

SPAN = 10
"""Evaluations (500 steps) whose median gives the level before and after the drop."""

ROUNDING = {"random": 0.5, "natural": 0.1}
FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9)


def drop(steps: list[int], scores: list[float]) -> dict[str, float]:
    """The sharp drop of one curve: its end step, the levels before and after, and their midpoint."""
    falls = [scores[k] - scores[k - WINDOW] for k in range(WINDOW, len(scores))]
    end = WINDOW + min(range(len(falls)), key=falls.__getitem__)
    start = end - WINDOW
    before = statistics.median(scores[max(0, start - SPAN + 1) : start + 1])
    after = statistics.median(scores[end : end + SPAN])
    return {
        "end_step": steps[end],
        "fall": falls[end - WINDOW],
        "before": before,
        "after": after,
        "midpoint": (before + after) / 2,
    }


def summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "q1": quartiles[0],
        "q3": quartiles[2],
    }


def analyse(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Drops, proposed thresholds, onsets (with a threshold sweep), checkpoints; see the module docstring."""
    result: dict[str, Any] = {"seeds": [r["seed"] for r in reports], "probes": {}}
    for probe in ("random", "natural"):
        drops, onsets, sweep = [], [], {}
        for r in reports:
            steps = [h["step"] for h in r["history"]]
            drops.append(drop(steps, [h[f"icl/{probe}"] for h in r["history"]]))
        mean_midpoint = statistics.fmean(d["midpoint"] for d in drops)
        unit = ROUNDING[probe]
        threshold = round(mean_midpoint / unit) * unit
        for t in (threshold - unit, threshold, threshold + unit):
            found = []
            for r in reports:
                steps = [h["step"] for h in r["history"]]
                found.append(find_onset(steps, [h[f"icl/{probe}"] for h in r["history"]], t))
            sweep[round(t, 3)] = [{"step": o.step, "censored": o.censored} for o in found]
            if t == threshold:
                onsets = found
        uncensored = [o.step for o in onsets if not o.censored]
        result["probes"][probe] = {
            "drops": drops,
            "mean_midpoint": mean_midpoint,
            "threshold": threshold,
            "onsets": [{"step": o.step, "censored": o.censored} for o in onsets],
            "onset_summary": summary(uncensored) if uncensored else None,
            "censored": sum(o.censored for o in onsets),
            "threshold_sweep": sweep,
        }
    median_onset = result["probes"]["random"]["onset_summary"]["median"]
    checkpoints = {}
    for fraction in FRACTIONS:
        step = int(50 * (fraction * median_onset // 50))
        rows = []
        for r in reports:
            at = next((h for h in r["history"] if h["step"] >= step), r["history"][-1])
            rows.append(
                {
                    k: at[k]
                    for k in ("step", "icl/random", "icl/natural", "heads/prev_max", "heads/prefix_max")
                }
            )
        checkpoints[fraction] = {"step": step, "runs": rows}
    result["checkpoints"] = checkpoints
    result["wall_seconds"] = summary([r["wall_seconds"] for r in reports])
    result["cpu_seconds"] = summary([r.get("cpu_seconds", float("nan")) for r in reports])
    result["final_val_loss"] = summary([r["history"][-1]["val/loss"] for r in reports])
    return result


def markdown(result: dict[str, Any], source: Path) -> str:
    seeds = result["seeds"]
    lines = [
        f"# Onset rule from {len(seeds)} exploratory baselines ({source})",
        "",
        f"`python -m research.induction.onset_rule {source}`",
        "",
    ]
    for probe, p in result["probes"].items():
        lines += [
            f"## Probe: {probe}",
            "",
            f"Mean drop midpoint {p['mean_midpoint']:.3f} → proposed threshold **{p['threshold']:g}**; "
            f"{p['censored']} of {len(seeds)} runs censored.",
            "",
            "| seed | drop ends | fall over 200 steps | level before | level after | midpoint | onset |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for seed, d, o in zip(seeds, p["drops"], p["onsets"], strict=True):
            onset = f"> {o['step']} (censored)" if o["censored"] else str(o["step"])
            lines.append(
                f"| {seed} | {d['end_step']} | {d['fall']:.3f} | {d['before']:.3f} | {d['after']:.3f} | "
                f"{d['midpoint']:.3f} | {onset} |"
            )
        s = p["onset_summary"]
        if s:
            lines += [
                "",
                f"Onset (uncensored runs): median {s['median']:.0f}, mean {s['mean']:.0f}, sd {s['sd']:.0f} "
                f"({100 * s['sd'] / s['mean']:.0f} % of the mean), range {s['min']:.0f}–{s['max']:.0f}, "
                f"quartiles {s['q1']:.0f}–{s['q3']:.0f}.",
            ]
        lines += ["", "Onsets at neighbouring thresholds:", ""]
        for t, found in p["threshold_sweep"].items():
            steps = ", ".join(f"{o['step']}{'+' if o['censored'] else ''}" for o in found)
            lines.append(f"- {t:g}: {steps}")
        lines.append("")
    if "natural" in result["probes"] and "random" in result["probes"]:
        pairs = zip(result["probes"]["random"]["onsets"], result["probes"]["natural"]["onsets"], strict=True)
        diffs = [n["step"] - r["step"] for r, n in pairs if not (r["censored"] or n["censored"])]
        if diffs:
            lines += [
                "Natural-probe onset minus random-probe onset per seed: "
                + ", ".join(str(d) for d in diffs)
                + f" (median {statistics.median(diffs):.0f}).",
                "",
            ]
    lines += [
        "## Candidate checkpoints (fraction of the median random-probe onset)",
        "",
        "| fraction | step | in-context random (min–max) | natural | previous-token max "
        "| prefix-matching max |",
        "|---:|---:|---|---|---|---|",
    ]
    for fraction, c in result["checkpoints"].items():

        def span(key: str, runs: list[dict[str, float]] = c["runs"]) -> str:
            values = [r[key] for r in runs]
            return f"{min(values):.3f}–{max(values):.3f}"

        lines.append(
            f"| {fraction} | {c['step']} | {span('icl/random')} | {span('icl/natural')} | "
            f"{span('heads/prev_max')} | {span('heads/prefix_max')} |"
        )
    w, cpu, v = result["wall_seconds"], result["cpu_seconds"], result["final_val_loss"]
    lines += [
        "",
        f"Per run: wall {w['median']:.0f} s median ({w['min']:.0f}–{w['max']:.0f}), "
        f"CPU {cpu['median']:.0f} s median ({cpu['min']:.0f}–{cpu['max']:.0f}); "
        f"final validation loss {v['mean']:.4f} ± {v['sd']:.4f} ({v['min']:.4f}–{v['max']:.4f}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, help="a study's output directory (with runs/baseline/*.json)")
    args = parser.parse_args()
    reports = load_runs(args.runs)["baseline"]
    result = analyse(reports)
    (args.runs / "onset_rule.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result, args.runs)
    (args.runs / "onset_rule.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
