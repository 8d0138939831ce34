"""LightningCLI entry: ``python -m recipes.induction fit --config recipes/induction/configs/base.yaml``.

The data's ``context`` is linked to the model's (set it under ``data:`` only). After ``fit`` the CLI makes
sure the last step was evaluated, prints the final metrics and the onset step of each probe (or that the
run is censored), logs them as ``final/…`` scalars, keeps them in ``cli.summary`` and, with
``--results PATH``, writes them with the whole evaluation history to a JSON file.

Torch uses ``INDUCTION_THREADS`` intra-op threads (default 1: the model is small, and more threads only add
synchronization on a shared CPU).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recipes.induction.data import InductionData
from recipes.induction.metrics import find_onset
from recipes.induction.model import InductionLM

PROBES = ("random", "natural")
"""The in-context probes: repeated random printable sequences, repeated natural-text segments."""


class InductionCLI(LightningCLI):
    """``LightningCLI`` for ``InductionLM`` + ``InductionData`` with a final report."""

    summary: dict[str, Any]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.context", "model.context")
        parser.add_argument("--results", type=str | None, default=None, help="write a JSON report here")

    def before_fit(self) -> None:
        self._started = time.perf_counter(), time.process_time()

    def after_fit(self) -> None:
        """Evaluate the last step if needed, then print, log and (``--results``) write the report."""
        wall, cpu = time.perf_counter() - self._started[0], time.process_time() - self._started[1]
        model, trainer = self.model, self.trainer
        if not model.history or model.history[-1]["step"] != trainer.global_step:
            trainer.validate(model, datamodule=self.datamodule, verbose=False)
        self.summary = summarize(model, wall, cpu, self._get(self.config, "seed_everything"))
        print(report_line(self.summary))
        final = {f"final/{k}": v for k, v in self.summary["final"].items() if k != "step"}
        for probe in PROBES:
            final[f"final/onset_{probe}"] = float(self.summary["onset"][probe]["step"])
            final[f"final/censored_{probe}"] = float(self.summary["onset"][probe]["censored"])
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
        path = self._get(self.config, "results")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(self.summary, indent=1) + "\n")


def summarize(
    model: InductionLM, wall_seconds: float, cpu_seconds: float, seed: int | None
) -> dict[str, Any]:
    """A run's report: seed, wall and CPU seconds of ``fit``, thresholds, onsets (``find_onset``), final
    metrics and the history (values rounded to 5 decimals)."""
    history = [{k: (v if k == "step" else round(v, 5)) for k, v in h.items()} for h in model.history]
    steps = [int(h["step"]) for h in history]
    thresholds = {"random": model.hparams.onset_threshold, "natural": model.hparams.natural_onset_threshold}
    onset = {}
    for probe in PROBES:
        found = find_onset(steps, [h[f"icl/{probe}"] for h in history], thresholds[probe])
        onset[probe] = {"step": found.step, "censored": found.censored}
    return {
        "seed": seed,
        "wall_seconds": round(wall_seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "thresholds": thresholds,
        "onset": onset,
        "final": dict(history[-1]),
        "history": history,
    }


def report_line(summary: dict[str, Any]) -> str:
    """One line: the final metrics and the onsets."""
    final = summary["final"]
    onsets = ", ".join(
        f"{probe} {'censored at ' if o['censored'] else ''}{o['step']}"
        for probe, o in summary["onset"].items()
    )
    return (
        f"final (step {final['step']}): val loss {final['val/loss']:.4f}, in-context score random "
        f"{final['icl/random']:.3f} / natural {final['icl/natural']:.3f}, prefix-matching max "
        f"{final['heads/prefix_max']:.3f}, previous-token max {final['heads/prev_max']:.3f}; "
        f"onset: {onsets}; {summary['wall_seconds']:.0f} s ({summary['cpu_seconds']:.0f} s CPU)"
    )


def main(args: list[str] | None = None, run: bool = True, **kwargs: Any) -> InductionCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` default to ``sys.argv[1:]``.

    Extra keyword arguments go to ``LightningCLI`` (e.g. ``save_config_callback=None``).
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return InductionCLI(InductionLM, InductionData, args=args, run=run, **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("INDUCTION_THREADS", "1")))
    main()
