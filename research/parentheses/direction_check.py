"""Does the online route's controlled direction move the nested score? An offline check in two parts.

1. **Estimate.** For each ``--estimate-seeds`` seed: train the baseline arm to step ``--step`` (the same
   weights the full run has there), then estimate ``χ`` with rows ``ood_nested`` (held-out OOD strings
   labelled FALSE) and ``dyck`` (held-out Dyck words labelled TRUE) over the ``depth_length`` groups, with
   ``--per-group`` probe strings drawn from every group (equal precision per column). The controlled
   NESTED direction is ``δ = solve_log_weights(χ, (−1, 0), mass)``: the change of the groups'
   log-weights that lowers the OOD loss at fixed Dyck loss to first order (``lp.PatterningCallback``'s
   solve). Reported: χ per group, ``δ``, its correlation across seeds and with the log-weights of the
   reference heuristic (mass-weighted).
2. **Causal test.** For each ``--test-seeds`` seed, train from scratch twice with fixed group weights
   ``natural mass × exp(±α·δ̂)`` (``δ̂ = δ / max|δ|`` averaged over the estimate seeds, ``α =
   --strength``): ``+`` is the direction predicted to raise the nested score. Reported: the paired
   difference ``+`` − ``−`` of the nested score (95 % t-interval, exact Wilcoxon p), accuracies.

``--estimates-from A`` skips part 1 and uses the estimates of an earlier check (e.g. the per-seed
estimates of a ``--branch`` check: their mean is the population's direction at that step, far less noisy
than one seed's), and ``--from-step K`` keeps natural weights up to step ``K`` and switches to the fixed
ones there, so the direction is applied in the phase it was measured in.

Writes ``results/direction_check_<name>.json`` and ``.md``. ``--combine A B --name C`` pools the test
runs of earlier checks ``A`` and ``B`` that estimated the same direction (e.g. run as two processes).

    python -m research.parentheses.direction_check --estimate-seeds 0 1 --step 40 \\
        --test-seeds 2 3 4 5 6 7 8 9 --strength 1.5 --name step40
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

import lightning_patterning as lp
from lightning_patterning.observables import ProbeLoss
from lightning_patterning.patterning.solve import solve_log_weights
from recipes.parentheses.cli import main as cli_main
from recipes.parentheses.data import ParenthesesDataset, boundary_violations
from recipes.parentheses.patterning import (
    direction_weights,
    group_keys,
    group_masses,
    heuristic_weights,
    log_weight_map,
    mean_direction,
)
from recipes.parentheses.stats import PURE_NESTED, nested_counts_fisher, t_interval, wilcoxon_signed_rank
from recipes.parentheses.sweep import QUIET, arm_path, bare_argv
from research.parentheses.configs import RESULTS, config_args

BASE = "baseline"


class _StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def baseline_cli(base: str, seed: int) -> Any:
    """The baseline arm's LightningCLI for ``seed`` on the base config ``base``, built but not fitted (no
    logger, no validation during fit)."""
    args = [
        *config_args(base),
        "--config",
        str(arm_path("baseline")),
        "--seed_everything",
        str(seed),
    ]
    args += ["--trainer.logger=false", *QUIET, "--trainer.limit_val_batches=0"]
    with bare_argv():
        return cli_main(args, run=False, save_config_callback=None)


PROBES = ("ood", "interior")


def probe_set(data: Any, probe: str) -> ParenthesesDataset:
    """The held-out OOD strings labelled FALSE that the observable scores: all of them (``"ood"``), or only
    the *interior* ones (``"interior"``: start with ``(`` and end with ``)``, so the two ends cannot give
    them away; the ones whose answer varies between runs)."""
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    strings = data.ood_probe_nested
    if probe == "ood":
        return strings
    interior = ~boundary_violations(strings.tokens)
    return ParenthesesDataset(strings.tokens[interior], strings.labels[interior])


def estimate(
    base: str,
    seed: int,
    step: int,
    per_group: int,
    sgld: lp.SGLDConfig,
    probe: str = "ood",
    validity_control: bool = False,
) -> dict[str, Any]:
    """χ (rows: the OOD probe ``probe_set(data, probe)``, ``dyck``, and with ``validity_control``
    ``near_balanced_false``; columns = groups) of the baseline run ``seed`` at ``step``, and the controlled
    direction ``δ = solve_log_weights(χ, (−1, 0[, 0]), mass)``: every row after the first held fixed."""
    cli = baseline_cli(base, seed)
    cli.trainer.callbacks.append(_StopAt(step))
    cli.trainer.fit(cli.model, cli.datamodule)
    data = cli.datamodule.datamodule
    train = data.train_set
    ids, names = group_keys(train)
    ids_t = torch.tensor(ids)
    generator = torch.Generator().manual_seed(seed)
    probe_indices: list[int] = []
    for k in range(len(names)):
        members = torch.nonzero(ids_t == k).flatten()
        probe_indices += members[torch.randperm(len(members), generator=generator)[:per_group]].tolist()
    observables = [
        ProbeLoss("ood_nested", probe_set(data, probe), max_samples=512),
        ProbeLoss("dyck", data.dyck_probe, max_samples=512),
    ]
    if validity_control:
        observables.append(ProbeLoss("near_balanced_false", data.near_balanced_false_probe, max_samples=512))
    start = time.perf_counter()
    chi = lp.estimate_susceptibilities(
        cli.model,
        lambda m, b: m.per_sample_loss(b),
        train,
        sgld,
        observables,
        train,
        probe_indices=probe_indices,
        groups=[ids[i] for i in probe_indices],
    )
    columns = [int(c) for c in chi.group_names]
    natural = group_masses(data, None)
    heuristic_mass = group_masses(data, heuristic_weights(train.strings, train.labels.tolist()))
    mass = torch.tensor([natural[names[c]] for c in columns], dtype=torch.float64)
    heuristic = torch.tensor([heuristic_mass[names[c]] for c in columns], dtype=torch.float64)
    target = torch.zeros(len(observables), dtype=torch.float64)
    target[0] = -1.0
    delta = solve_log_weights(chi.matrix.double(), target, mass)
    return {
        "seed": seed,
        "step": step,
        "seconds": time.perf_counter() - start,
        "groups": [list(names[c]) for c in columns],
        "mass": mass.tolist(),
        "heuristic_log_ratio": (heuristic / mass).log().tolist(),
        "rows": chi.names,
        "chi": chi.matrix.tolist(),
        "stderr": chi.stderr.tolist(),
        "delta": (delta / delta.abs().max()).tolist(),
    }


def weighted_correlation(a: list[float], b: list[float], w: list[float]) -> float:
    """Pearson correlation of ``a`` and ``b`` under weights ``w``."""
    at, bt, wt = (torch.tensor(x, dtype=torch.float64) for x in (a, b, w))
    wt = wt / wt.sum()
    at, bt = at - (wt * at).sum(), bt - (wt * bt).sum()
    return float((wt * at * bt).sum() / ((wt * at * at).sum() * (wt * bt * bt).sum()).sqrt())


class _SetWeightsAt(L.Callback):
    """Sets the data module's weights when ``global_step`` reaches ``step`` (a one-shot online update)."""

    def __init__(self, step: int, weights: torch.Tensor) -> None:
        self.step, self.weights = step, weights

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.datamodule.set_weights(self.weights)


def weighted_cli(
    base: str,
    seed: int,
    log_weights: dict[tuple[int, ...], float],
    sign: int,
    strength: float,
    from_step: int = 0,
) -> Any:
    """The baseline arm's CLI for ``seed`` with group weights ``natural × exp(sign·strength·log_weights)``:
    from the start, or (``from_step`` > 0) natural weights up to ``from_step`` and the new ones after it."""
    cli = baseline_cli(base, seed)
    ids, names = group_keys(cli.datamodule.datamodule.train_set)
    weights = direction_weights(ids, names, log_weights, sign * strength)
    if from_step > 0:
        cli.trainer.callbacks.append(_SetWeightsAt(from_step, weights))
    else:
        cli.datamodule.set_weights(weights)
    return cli


def causal_run(cli: Any, seed: int, sign: int) -> dict:
    """Train a :func:`weighted_cli` to the end; its final metrics with ``seed``, ``sign`` and the seconds."""
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    cli.after_fit()
    return {"seed": seed, "sign": sign, "seconds": time.perf_counter() - start, **cli.final_metrics}


def baseline_scores(csv_paths: list[Path] | None) -> dict[str, dict[str, float]]:
    """``{"baseline": {seed: nested score}}`` from the baseline rows of sweep CSVs (empty without paths).

    A seed with more than one baseline row is an error: which run would pair with it is ambiguous.
    """
    if not csv_paths:
        return {}
    scores: dict[str, float] = {}
    for path in csv_paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["arm"] != "baseline":
                    continue
                if row["seed"] in scores:
                    raise ValueError(f"--baseline: seed {row['seed']} has more than one baseline row")
                scores[row["seed"]] = float(row["nested_score"])
    return {"baseline": scores}


def p_value(p: float) -> str:
    """``p`` to four decimals, or to two significant digits below 0.0001 (where four decimals read 0)."""
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


MAX_PAIRS_LISTED = 6  # the report lists each pair of estimates' correlation up to 4 estimates


def summarize(result: dict[str, Any]) -> str:
    estimates, runs = result["estimates"], result["runs"]
    lines = [f"Command: `{result['command']}`", "", "## 1. Controlled NESTED direction at the checkpoint", ""]
    if estimates:
        shown = estimates[:2]
        head = "| group (label, depth or imbalance, length bucket) | mass | heuristic log-ratio | "
        head += " | ".join(f"χ_ood / χ_dyck / δ̂ (seed {e['seed']})" for e in shown) + " |"
        lines += [head, "|---|---:|---:|" + "---:|" * len(shown)]
        first = estimates[0]
        for i, group in enumerate(first["groups"]):
            cells = [
                f"{e['chi'][0][i]:+.4f} ± {e['stderr'][0][i]:.4f} / {e['chi'][1][i]:+.4f} / "
                f"{e['delta'][i]:+.2f}"
                for e in shown
            ]
            lines.append(
                f"| {tuple(group)} | {first['mass'][i]:.3f} | {first['heuristic_log_ratio'][i]:+.2f} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
        heuristic = [weighted_correlation(e["delta"], e["heuristic_log_ratio"], e["mass"]) for e in estimates]
        between = {
            (a["seed"], b["seed"]): weighted_correlation(a["delta"], b["delta"], [1.0] * len(a["delta"]))
            for i, a in enumerate(estimates)
            for b in estimates[i + 1 :]
        }
        if len(estimates) <= 2:
            for e, corr in zip(estimates, heuristic, strict=True):
                lines.append(
                    f"- seed {e['seed']}: correlation of δ with the heuristic's log-weights {corr:+.2f}"
                )
        else:
            lines += [
                f"- δ vs the heuristic's log-weights: mean correlation {statistics.mean(heuristic):+.2f} "
                f"(range {min(heuristic):+.2f} to {max(heuristic):+.2f}, {len(heuristic)} seeds)",
                f"- δ between seeds: mean pairwise correlation {statistics.mean(between.values()):+.2f} "
                f"(range {min(between.values()):+.2f} to {max(between.values()):+.2f})",
            ]
        if len(between) <= MAX_PAIRS_LISTED:
            for (a, b), corr in between.items():
                lines.append(f"- δ of seed {a} vs seed {b}: correlation {corr:+.2f}")
        if len(first["rows"]) > 2:
            lines.append(f"- rows held fixed in the solve: {', '.join(first['rows'][1:])}")
        lines.append("")
    if runs:
        by = {(r["seed"], r["sign"]): r for r in runs}
        seeds = sorted({r["seed"] for r in runs if (r["seed"], -r["sign"]) in by})
        diffs = [by[s, 1]["nested_score"] - by[s, -1]["nested_score"] for s in seeds]
        branch, from_step = result.get("branch_step"), result.get("from_step", 0)
        weights = f"weights natural × exp(±{result['strength']}·δ̂)"
        if branch:
            title = (
                f"## 2. Branching at step {branch}: {weights} from then on, δ̂ estimated on the same seed "
                "at that step"
            )
        elif from_step:
            title = (
                f"## 2. Natural weights to step {from_step}, then {weights}, δ̂ the mean direction of the "
                f"{len(estimates)} estimates above"
            )
        else:
            title = f"## 2. Training from scratch with {weights}"
        lines += [
            title,
            "",
            "| seed | nested score (+δ̂, predicted up) | nested score (−δ̂) | + minus − | accuracy + / − |",
            "|---:|---:|---:|---:|---:|",
        ]
        for s, d in zip(seeds, diffs, strict=True):
            plus, minus = by[s, 1], by[s, -1]
            lines.append(
                f"| {s} | {plus['nested_score']:.3f} | {minus['nested_score']:.3f} | {d:+.3f} | "
                f"{plus['accuracy']:.4f} / {minus['accuracy']:.4f} |"
            )
        if len(diffs) >= 2:
            mean, low, high = t_interval(diffs)
            _, p = wilcoxon_signed_rank(diffs)
            lines += [
                "",
                f"Paired difference (+) − (−): {mean:+.3f} [{low:+.3f}, {high:+.3f}] (95 % t), "
                f"{sum(d > 0 for d in diffs)} / {len(diffs)} seeds up, exact Wilcoxon p = {p_value(p)}; "
                f"nested score + {statistics.mean(by[s, 1]['nested_score'] for s in seeds):.3f}, "
                f"− {statistics.mean(by[s, -1]['nested_score'] for s in seeds):.3f}.",
            ]
        baseline = {int(k): v for k, v in result.get("baseline", {}).items()}
        paired = [s for s in seeds if s in baseline]
        if len(paired) >= 2:
            lines += [
                "",
                f"Each direction against the baseline run of its seed ({len(paired)} seeds):",
                "",
            ]
            for sign, name in ((1, "+δ̂"), (-1, "−δ̂")):
                d = [by[s, sign]["nested_score"] - baseline[s] for s in paired]
                mean, low, high = t_interval(d)
                lines.append(
                    f"- {name} − baseline: {mean:+.3f} [{low:+.3f}, {high:+.3f}], {sum(x > 0 for x in d)} / "
                    f"{len(d)} seeds up, exact Wilcoxon p = {p_value(wilcoxon_signed_rank(d)[1])}"
                )
            base_scores = [baseline[s] for s in paired]
            (up, base, p_up), (down, _, p_down) = (
                nested_counts_fisher([by[s, sign]["nested_score"] for s in paired], base_scores, PURE_NESTED)
                for sign in (1, -1)
            )
            lines.append(
                f"- seeds above {PURE_NESTED} (pure NESTED): +δ̂ {up}, −δ̂ {down}, baseline {base} of "
                f"{len(paired)}; Fisher exact p against the baseline {p_value(p_up)} (+δ̂), "
                f"{p_value(p_down)} (−δ̂)"
            )
    return "\n".join(lines) + "\n"


def write_report(out: Path, result: dict[str, Any], table_of: Callable[[dict[str, Any]], str]) -> None:
    """Write ``result`` to ``out`` (JSON) and ``table_of(result)`` next to it (``.md``); print the table."""
    out.write_text(json.dumps(result))
    table = table_of(result)
    out.with_suffix(".md").write_text(table)
    print(table)


def _path(name: str) -> Path:
    return RESULTS / f"direction_check_{name}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=BASE)
    parser.add_argument("--estimate-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--step", type=int, default=40, help="checkpoint (training step) of the estimate")
    parser.add_argument("--per-group", type=int, default=32, help="probe strings per group")
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--test-seeds", type=int, nargs="*", default=[2, 3, 4, 5, 6, 7, 8, 9])
    parser.add_argument("--strength", type=float, default=1.5, help="α of the fixed weights")
    parser.add_argument("--name", default="step40")
    parser.add_argument(
        "--probe", choices=PROBES, default="ood", help="OOD probe strings: all, or only the interior ones"
    )
    parser.add_argument(
        "--validity-control",
        action="store_true",
        help="also hold fixed the loss of held-out near-balanced FALSE strings (|imbalance| 2, length >= 10)",
    )
    parser.add_argument(
        "--branch",
        action="store_true",
        help="instead of estimate seeds: each test seed estimates its own δ at --step, and its ± runs are "
        "its baseline run up to --step, re-weighted from then on (a one-shot online update)",
    )
    parser.add_argument(
        "--estimates-from",
        nargs="+",
        metavar="NAME",
        help="instead of estimating: the estimates of earlier checks (e.g. every seed of a --branch check); "
        "the test runs use their mean direction",
    )
    parser.add_argument(
        "--from-step",
        type=int,
        default=0,
        help="the test runs keep natural weights up to this step and switch to the fixed ones there",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        nargs="+",
        default=None,
        help="sweep CSVs whose baseline rows (same seeds) the two directions are also compared with",
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="NAME",
        help="instead: pool the test runs of earlier checks that share the estimated direction into --name",
    )
    args = parser.parse_args(argv)
    if args.branch and (args.estimates_from or args.from_step):
        parser.error(
            "--branch estimates each seed's own direction; it takes neither --estimates-from nor --from-step"
        )
    torch.set_num_threads(1)
    out = _path(args.name)
    command = "python -m research.parentheses.direction_check " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    if args.combine:
        parts = [json.loads(_path(n).read_text()) for n in args.combine]
        keys = {
            json.dumps([p.get("mean_delta"), p["strength"], p.get("branch_step"), p.get("from_step", 0)])
            for p in parts
        }
        if len(keys) != 1:
            parser.error("--combine: the checks must share the direction (or branch step) and the strength")
        pooled = {
            **parts[0],
            "command": command,
            "runs": [r for p in parts for r in p["runs"]],
            "estimates": [e for p in parts for e in p["estimates"]]
            if "branch_step" in parts[0]
            else parts[0]["estimates"],
        }
        pooled.update(baseline_scores(args.baseline))
        write_report(out, pooled, summarize)
        return
    result: dict[str, Any] = {
        "command": command,
        "strength": args.strength,
        "probe": args.probe,
        "validity_control": args.validity_control,
        "estimates": [],
        "runs": [],
    }
    result.update(baseline_scores(args.baseline))
    sgld = lp.SGLDConfig(
        lr=1e-4, nbeta=30.0, localization=300.0, num_chains=args.chains, num_draws=args.draws, batch_size=64
    )
    settings: dict[str, Any] = {
        "base": args.config,
        "step": args.step,
        "per_group": args.per_group,
        "sgld": sgld,
        "probe": args.probe,
        "validity_control": args.validity_control,
    }
    if args.branch:
        result["branch_step"] = args.step
        for seed in args.test_seeds:
            result["estimates"].append(estimate(**settings, seed=seed))
            own = result["estimates"][-1]
            log_weights = log_weight_map(own["groups"], own["delta"])
            for sign in (1, -1):
                cli = weighted_cli(args.config, seed, log_weights, sign, args.strength, from_step=args.step)
                run = causal_run(cli, seed, sign)
                result["runs"].append(run)
                print(
                    f"[direction_check] seed {seed} branch {sign:+d}: {run['nested_score']:.3f}", flush=True
                )
            out.write_text(json.dumps(result))
        write_report(out, result, summarize)
        return
    if args.estimates_from:
        result["estimates"] = [
            e for n in args.estimates_from for e in json.loads(_path(n).read_text())["estimates"]
        ]
    else:
        for seed in args.estimate_seeds:
            result["estimates"].append(estimate(**settings, seed=seed))
            out.write_text(json.dumps(result))
    mean_delta = mean_direction(result["estimates"])
    log_weights = log_weight_map(result["estimates"][0]["groups"], mean_delta)
    result["mean_delta"], result["from_step"] = mean_delta.tolist(), args.from_step
    for seed in args.test_seeds:
        for sign in (1, -1):
            cli = weighted_cli(args.config, seed, log_weights, sign, args.strength, from_step=args.from_step)
            result["runs"].append(causal_run(cli, seed, sign))
            print(f"[direction_check] seed {seed} sign {sign:+d}: {result['runs'][-1]['nested_score']:.3f}")
            out.write_text(json.dumps(result))
    write_report(out, result, summarize)


if __name__ == "__main__":
    main()
