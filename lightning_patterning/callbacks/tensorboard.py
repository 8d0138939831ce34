"""TensorBoard helpers: figures and the custom-scalars layout, behind an isinstance check.

Figures are drawn on ``matplotlib.figure.Figure`` objects with an Agg canvas of their own: no pyplot,
so importing or running this never touches matplotlib's global state (its backend, pyplot's figures).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_patterning.patterning.tokens import TokenWeightRule

_warned: set[str] = set()


def tensorboard_writers(trainer: pl.Trainer, what: str) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer; warns once per ``what`` if none."""
    writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not writers and trainer.loggers and what not in _warned:
        _warned.add(what)
        rank_zero_warn(f"lightning_patterning logs {what} only to a TensorBoardLogger; none is attached.")
    return writers


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Send the finite scalars straight to every logger at ``step`` (unaffected by ``log_every_n_steps``);
    NaN/inf values are left out."""
    finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
    if not finite:
        return
    for logger in trainer.loggers:
        logger.log_metrics(finite, step=step)


def log_trace_figure(trainer: pl.Trainer, tag: str, trace: torch.Tensor, reference: float, step: int) -> None:
    """A figure of the per-chain loss traces ``[chains, draws]`` with the checkpoint's loss as a line."""
    writers = tensorboard_writers(trainer, "figures")
    if not writers or trainer.global_rank != 0:
        return
    figure, axis = _figure((6, 3.5))
    for chain, row in enumerate(trace):
        axis.plot(row.numpy(), lw=0.8, label=f"chain {chain}")
    axis.axhline(reference, color="black", ls="--", lw=1, label="L(w*)")
    axis.set_xlabel("draw")
    axis.set_ylabel("minibatch loss")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    for writer in writers:
        add_figure(writer, tag, figure, step)


def add_layout(trainer: pl.Trainer, section: str, charts: dict[str, list[str]]) -> None:
    """Register a custom-scalars dashboard section: chart title → tag regexes (one multiline chart each).

    TensorBoard shows only the last layout written to a run, so each writer keeps the sections registered
    so far (one per callback) and every call writes their union."""
    for writer in tensorboard_writers(trainer, "the custom-scalars layout"):
        sections = writer.__dict__.setdefault("_lightning_patterning_layout", {})
        sections[section] = {title: ["Multiline", tags] for title, tags in charts.items()}
        writer.add_custom_scalars(dict(sections))


def log_matrix_figures(
    trainer: pl.Trainer,
    prefix: str,
    matrix: torch.Tensor,
    names: list[str],
    columns: list[str],
    standardized: torch.Tensor,
    explained: torch.Tensor,
    data_loadings: torch.Tensor,
    step: int,
) -> None:
    """The standardized susceptibility matrix as a heatmap, the PCA spectrum, and the PC1–PC2 scatter of
    the data loadings ``v_1, v_2``."""
    writers = tensorboard_writers(trainer, "figures")
    if not writers or trainer.global_rank != 0:
        return
    heat, axis = _figure((8, 0.4 * len(names) + 1.5))
    limit = float(standardized.abs().max()) or 1.0
    image = axis.imshow(
        standardized.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest"
    )
    axis.set_yticks(range(len(names)), names, fontsize=7)
    if len(columns) <= 40:
        axis.set_xticks(range(len(columns)), columns, fontsize=6, rotation=90)
    axis.set_xlabel("probe samples / groups")
    heat.colorbar(image, ax=axis, label="χ (row z-score)")
    heat.tight_layout()
    spectrum, axis = _figure((4, 3))
    axis.bar(range(1, len(explained) + 1), explained.numpy())
    axis.set_xlabel("principal component")
    axis.set_ylabel("explained variance")
    spectrum.tight_layout()
    scatter, axis = _figure((4, 4))
    if data_loadings.shape[1] >= 2:
        axis.scatter(data_loadings[:, 0].numpy(), data_loadings[:, 1].numpy(), s=6)
    axis.set_xlabel("PC1 data loading v₁")
    axis.set_ylabel("PC2 data loading v₂")
    scatter.tight_layout()
    for writer in writers:
        add_figure(writer, f"{prefix}/matrix", heat, step)
        add_figure(writer, f"{prefix}/explained_variance", spectrum, step)
        add_figure(writer, f"{prefix}/pc1_pc2_data", scatter, step)


def add_figure(writer: Any, tag: str, figure: Figure, step: int) -> None:
    """Render ``figure`` on its Agg canvas and log it as an image (``SummaryWriter.add_figure`` would
    import pyplot to close it)."""
    canvas = figure.canvas
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3]
    writer.add_image(tag, image, global_step=step, dataformats="HWC")


def _figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    """A figure with one axis, on an Agg canvas of its own (no pyplot: nothing global is registered, so
    there is nothing to close)."""
    figure = Figure(figsize=size)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def log_token_weights(
    trainer: pl.Trainer,
    rule: TokenWeightRule,
    step: int,
    batch: Any = None,
    mask: torch.Tensor | None = None,
    prefix: str = "token_weights",
) -> None:
    """Per-token weights in TensorBoard: the scalar ``{prefix}/class/{name}`` of every class weight (mean 1
    over classes) to every logger, and on rank 0 the histogram ``{prefix}/per_token`` of the weights of
    ``batch``'s valid tokens (``mask``; all positions when ``None``) normalised to mean 1, as
    ``lp.weighted_loss`` applies them (without a batch: a histogram of the class weights).

    Every rank may call it (loggers write on rank 0 only); a recipe or callback calls it after a change.
    """
    weights = rule.class_weights
    log_scalars(
        trainer,
        {f"{prefix}/class/{name}": float(w) for name, w in zip(rule.class_names, weights, strict=True)},
        step,
    )
    writers = tensorboard_writers(trainer, "histograms")
    if not writers or trainer.global_rank != 0:
        return
    values = weights
    if batch is not None:
        per_token = rule(batch).detach().double().cpu()
        values = per_token[mask.cpu()] if mask is not None else per_token.flatten()
        values = values / values.mean() if float(values.mean()) > 0 else values
    for writer in writers:
        writer.add_histogram(f"{prefix}/per_token", values, global_step=step)
