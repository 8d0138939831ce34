"""TensorBoard helpers: figures and the custom-scalars layout, behind an isinstance check."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

matplotlib.use("Agg")
from matplotlib import pyplot as plt

_warned: set[str] = set()


def tensorboard_writers(trainer: pl.Trainer, what: str) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer; warns once per ``what`` if none."""
    writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not writers and trainer.loggers and what not in _warned:
        _warned.add(what)
        rank_zero_warn(f"lightning_patterning logs {what} only to a TensorBoardLogger; none is attached.")
    return writers


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send scalars straight to every logger at ``step`` (unaffected by ``log_every_n_steps``)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_trace_figure(trainer: pl.Trainer, tag: str, trace: torch.Tensor, reference: float, step: int) -> None:
    """A figure of the per-chain loss traces ``[chains, draws]`` with the checkpoint's loss as a line."""
    writers = tensorboard_writers(trainer, "figures")
    if not writers or trainer.global_rank != 0:
        return
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for chain, row in enumerate(trace):
        axis.plot(row.numpy(), lw=0.8, label=f"chain {chain}")
    axis.axhline(reference, color="black", ls="--", lw=1, label="L(w*)")
    axis.set_xlabel("draw")
    axis.set_ylabel("minibatch loss")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    for writer in writers:
        writer.add_figure(tag, figure, global_step=step)
    plt.close(figure)


def add_layout(trainer: pl.Trainer, section: str, charts: dict[str, list[str]]) -> None:
    """Register a custom-scalars dashboard section: chart title → tag regexes (one multiline chart each)."""
    layout = {section: {title: ["Multiline", tags] for title, tags in charts.items()}}
    for writer in tensorboard_writers(trainer, "the custom-scalars layout"):
        writer.add_custom_scalars(layout)
