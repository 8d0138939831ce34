"""Where does a fixed re-weighting take training? The probe losses and the nested score along the run.

``direction_check`` found that the controlled direction ``δ̂`` estimated at step 10 moves the nested score
of a full run the opposite way to the linear response's prediction. This check follows runs of a
``direction_check`` result's ``±δ̂`` weights and of the baseline (natural weights), seed by seed, and
records at the steps ``STEPS`` (0, 5, 10, …, 700, and on longer schedules 1000 and the last step):

* ``ood_loss``: mean loss of the held-out OOD strings labelled FALSE (the observable the solve lowers
  along ``+δ̂``: lower = more NESTED);
* ``dyck_loss``: mean loss of the held-out Dyck words labelled TRUE (the control, held fixed by the solve);
* ``nested_score`` and ``accuracy`` (``evaluate``, OOD test and validation sets).

The susceptibility predicts the *first-order* response of the posterior at the checkpoint; this shows
whether the training run's OOD loss follows that prediction early on and when it turns. Writes
``results/trajectory_<name>.json`` and ``.md`` (means over seeds, and the paired ``+`` − ``−`` per step).
Without ``--check`` it follows the baseline runs alone: how early a configuration's algorithm is decided
(the correlation of each step's nested score with the final one), to choose the checkpoint of an estimate;
the report states the step the recipe's window rule gives (``window_step``).

    python -m research.parentheses.trajectory --check step10_16seeds --seeds 2 3 4 5 6 7 8 9 --name step10
    python -m research.parentheses.trajectory --config <config> --seeds 0 1 2 3 --name <config>_window
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from typing import Any

import lightning as L
import torch

from recipes.parentheses.model import ParenthesesClassifier, evaluate
from recipes.parentheses.patterning import log_weight_map
from recipes.parentheses.stats import t_interval
from research.parentheses.configs import RESULTS
from research.parentheses.direction_check import BASE, weighted_cli, write_report

STEPS = (0, 5, 10, 20, 40, 80, 150, 300, 500, 700, 1000)


def recording_steps(max_steps: int) -> tuple[int, ...]:
    """The steps of ``STEPS`` within a run of ``max_steps``, and ``max_steps`` itself (the final score)."""
    return tuple(sorted({step for step in STEPS if step < max_steps} | {max_steps}))


ROUTES = {1: "+δ̂", -1: "−δ̂", 0: "baseline"}


def probe_loss(model: ParenthesesClassifier, dataset: Any) -> float:
    """Mean ``per_sample_loss`` of ``dataset`` (no grad, eval mode)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model.per_sample_loss([dataset.tokens, dataset.labels]).mean().item()
    model.train(was_training)
    return loss


class TrajectoryRecorder(L.Callback):
    """Records the probe losses, nested score and accuracy when ``global_step`` reaches each of ``steps``."""

    def __init__(self, data: Any, steps: tuple[int, ...]) -> None:
        self.data, self.steps, self.rows = data, set(steps), []

    def _record(self, model: ParenthesesClassifier, step: int) -> None:
        scores = evaluate(
            model, self.data.val_set.tokens, self.data.val_set.labels, self.data.ood_test.tokens
        )
        self.rows.append(
            {
                "step": step,
                "ood_loss": probe_loss(model, self.data.ood_probe_nested),
                "dyck_loss": probe_loss(model, self.data.dyck_probe),
                "nested_score": scores["nested_score"],
                "accuracy": scores["accuracy"],
            }
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if 0 in self.steps:
            self._record(pl_module, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            self._record(pl_module, trainer.global_step)


def trajectory_run(
    base: str, seed: int, log_weights: dict[tuple[int, ...], float], sign: int, strength: float
) -> list[dict[str, float]]:
    """Train ``seed`` from scratch with group weights ``natural × exp(sign·strength·log_weights)``
    (``sign`` 0: natural) and return the recorder's rows."""
    cli = weighted_cli(base, seed, log_weights, sign, strength)
    recorder = TrajectoryRecorder(cli.datamodule.datamodule, recording_steps(cli.trainer.max_steps))
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    return recorder.rows


def _correlation(a: list[float], b: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    try:
        return statistics.correlation(a, b)
    except statistics.StatisticsError:
        return math.nan


WINDOW_THRESHOLD = 0.3


def window_step(correlations: dict[int, float], threshold: float = WINDOW_THRESHOLD) -> int | None:
    """The checkpoint rule of the recipe's estimates: the last recorded step (before the final one) whose
    nested score correlates with the final score by less than ``threshold`` — the last step at which the
    algorithm is not yet decided. ``None`` when every step is above it (or undefined)."""
    open_steps = [step for step, corr in correlations.items() if corr < threshold]
    return max(open_steps, default=None)


def summarize(result: dict[str, Any]) -> str:
    """Markdown: per step, the mean over seeds of each route, the paired ``+`` − ``−`` differences, and
    how well each step's nested score foretells the final one (Pearson correlation across seeds and
    routes: when the algorithm is decided)."""
    runs = result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["seed"], r["sign"]): {row["step"]: row for row in r["rows"]} for r in runs}
    steps = [row["step"] for row in runs[0]["rows"]]
    directed = result["check"] is not None
    title = "baseline runs"
    if directed:
        title = f"the `{result['check']}` direction (strength {result['strength']})"
    lines = [f"# Trajectory of {title}", "", f"`{result['command']}`", ""]
    if directed:
        lines += [
            f"{len(seeds)} seeds. Means over seeds; `+ − −` is the paired difference (95 % t-interval).",
            "",
            "| step | quantity | +δ̂ | −δ̂ | baseline | + − − [95 % CI] |",
            "|---:|---|---:|---:|---:|---:|",
        ]
    else:
        lines += [f"{len(seeds)} seeds. Means over seeds.", "", "| step | quantity | baseline |"]
        lines.append("|---:|---|---:|")
    for step in steps:
        for quantity in ("ood_loss", "dyck_loss", "nested_score", "accuracy"):
            baseline = statistics.fmean(by[(s, 0)][step][quantity] for s in seeds)
            if not directed:
                lines.append(f"| {step} | {quantity} | {baseline:.4f} |")
                continue
            means = [statistics.fmean(by[(s, sign)][step][quantity] for s in seeds) for sign in (1, -1)]
            diffs = [by[(s, 1)][step][quantity] - by[(s, -1)][step][quantity] for s in seeds]
            mean, low, high = t_interval(diffs)
            lines.append(
                f"| {step} | {quantity} | {means[0]:.4f} | {means[1]:.4f} | {baseline:.4f} | "
                f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] |"
            )
    final = [by[key][steps[-1]]["nested_score"] for key in sorted(by)]
    correlations = {
        step: _correlation([by[key][step]["nested_score"] for key in sorted(by)], final)
        for step in steps[1:-1]
    }
    lines += ["", "| step | corr(nested score at step, final nested score) |", "|---:|---:|"]
    lines += [f"| {step} | {corr:+.3f} |" for step, corr in correlations.items()]
    window = window_step(correlations)
    lines += [
        "",
        f"Window rule (the last recorded step whose correlation is below {WINDOW_THRESHOLD:+.1f}): "
        + ("none" if window is None else f"step {window}"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=BASE)
    parser.add_argument(
        "--check", help="a direction_check result name (its δ̂, strength); without it, baseline runs only"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8, 9])
    parser.add_argument("--name", required=True)
    parser.add_argument(
        "--combine", nargs="+", metavar="NAME", help="instead: pool earlier trajectories of one check"
    )
    args = parser.parse_args(argv)
    command = "python -m research.parentheses.trajectory " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    out = RESULTS / f"trajectory_{args.name}.json"
    if args.combine:
        parts = [json.loads((RESULTS / f"trajectory_{n}.json").read_text()) for n in args.combine]
        if len({(p["check"], p["strength"]) for p in parts}) != 1:
            parser.error("--combine: the trajectories must follow the same check")
        pooled = {**parts[0], "command": command, "runs": [r for p in parts for r in p["runs"]]}
        write_report(out, pooled, summarize)
        return
    torch.set_num_threads(1)
    if args.check is None:
        log_weights, strength, signs = {}, 0.0, (0,)
    else:
        check = json.loads((RESULTS / f"direction_check_{args.check}.json").read_text())
        log_weights = log_weight_map(check["estimates"][0]["groups"], check["mean_delta"])
        strength, signs = check["strength"], tuple(ROUTES)
    result: dict[str, Any] = {"command": command, "check": args.check, "strength": strength, "runs": []}
    for seed in args.seeds:
        for sign in signs:
            rows = trajectory_run(args.config, seed, log_weights, sign, strength)
            result["runs"].append({"seed": seed, "sign": sign, "rows": rows})
            print(f"[trajectory] seed {seed} {ROUTES[sign]}: nested score {rows[-1]['nested_score']:.3f}")
            out.write_text(json.dumps(result))
    write_report(out, result, summarize)


if __name__ == "__main__":
    main()
