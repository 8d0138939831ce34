"""Figures of a report, drawn with matplotlib's object API (no pyplot, no global backend change)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.reporting.events import Histogram, Series

MIN_EXPLAINED = 0.01
"""A principal component carrying less than this fraction of the variance is not drawn."""


def new_figure(width: float, height: float) -> Figure:
    """A figure with an Agg canvas of its own (nothing global is touched)."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def estimate_with_band(mean: Series, std: Series, title: str, ylabel: str = "LLC λ̂") -> Figure:
    """An estimate over training steps with a ±1 standard-deviation band (over chains)."""
    figure = new_figure(6, 3.4)
    axis = figure.add_subplot()
    steps, values = mean
    spread = dict(zip(*std, strict=True))
    low = [v - spread.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
    high = [v + spread.get(s, 0.0) for s, v in zip(steps, values, strict=True)]
    axis.fill_between(steps, low, high, alpha=0.25, label="± std over chains")
    axis.plot(steps, values, marker="o", ms=3, label="mean")
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    return figure


def curves(series: dict[str, Series], title: str, ylabel: str) -> Figure:
    """Several scalar series on one axis (e.g. the training loss of every run)."""
    figure = new_figure(6, 3.4)
    axis = figure.add_subplot()
    for label, (steps, values) in series.items():
        axis.plot(steps, values, lw=1, label=label)
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=9)
    if 1 < len(series) <= 12:
        axis.legend(fontsize=7)
    return figure


def susceptibility_matrix(chi: Susceptibilities, title: str) -> Figure:
    """The row-standardized χ as a heatmap (rows: observables, columns: samples or groups). With fewer than
    three columns a z-score is always ±0.7, so the raw χ ± standard error is shown as bars instead."""
    columns = chi.columns
    if len(columns) < 3:
        figure = new_figure(6, 1.2 + 0.5 * len(chi.names))
        axis = figure.add_subplot()
        width = 0.8 / len(columns)
        for j, label in enumerate(columns):
            positions = [i + j * width for i in range(len(chi.names))]
            axis.barh(
                positions, chi.matrix[:, j].tolist(), width, xerr=chi.stderr[:, j].tolist(), label=label
            )
        axis.set_yticks([i + 0.4 - width / 2 for i in range(len(chi.names))], chi.names, fontsize=8)
        axis.set_xlabel("χ (± standard error)")
        axis.legend(fontsize=7, title="column")
    else:
        standardized = chi.standardized()
        figure = new_figure(8, 1.5 + 0.35 * len(chi.names))
        axis = figure.add_subplot()
        limit = float(standardized.abs().max()) or 1.0
        image = axis.imshow(
            standardized.numpy(),
            aspect="auto",
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            interpolation="nearest",
        )
        axis.set_yticks(range(len(chi.names)), chi.names, fontsize=7)
        if len(columns) <= 40:
            axis.set_xticks(range(len(columns)), columns, fontsize=6, rotation=90)
        axis.set_xlabel("probe samples / groups")
        figure.colorbar(image, ax=axis, label="χ (row z-score)")
    axis.set_title(title, fontsize=9)
    return figure


def principal_components(chi: Susceptibilities, title: str) -> Figure | None:
    """Data loadings on PC1 and PC2 of the standardized χ, coloured by group when the columns are samples
    with groups; ``None`` when χ has fewer than three columns or PC2 carries less than ``MIN_EXPLAINED``
    of the variance (its loadings would be noise)."""
    _, s, v = chi.pca()
    explained = chi.explained_variance()
    if int((s > 0).sum()) < 2 or v.shape[0] < 3 or float(explained[1]) < MIN_EXPLAINED:
        return None
    figure = new_figure(4.6, 4.2)
    axis = figure.add_subplot()
    colours = chi.group_index.tolist() if chi.group_index is not None and chi.group_names is None else None
    style = {"c": colours, "cmap": "tab10"} if colours is not None else {}
    points = axis.scatter(v[:, 0].numpy(), v[:, 1].numpy(), s=10, **style)
    if chi.group_names is not None and len(chi.columns) <= 40:
        for label, x, y in zip(chi.columns, v[:, 0].tolist(), v[:, 1].tolist(), strict=True):
            axis.annotate(label, (x, y), fontsize=6)
    if colours is not None:
        figure.colorbar(points, ax=axis, label="group")
    axis.axhline(0, color="grey", lw=0.5)
    axis.axvline(0, color="grey", lw=0.5)
    axis.set_xlabel(f"PC1 data loading v₁ ({float(explained[0]):.0%})")
    axis.set_ylabel(f"PC2 data loading v₂ ({float(explained[1]):.0%})")
    axis.set_title(title, fontsize=9)
    return figure


def weights_over_time(histograms: Sequence[Histogram], title: str) -> Figure:
    """The spread of the sampling weights at each update: median, 5–95 % band, min and max."""
    figure = new_figure(6, 3.4)
    axis = figure.add_subplot()
    steps = [h.step for h in histograms]
    axis.fill_between(
        steps,
        [h.quantile(0.05) for h in histograms],
        [h.quantile(0.95) for h in histograms],
        alpha=0.25,
        label="5–95 %",
    )
    axis.plot(steps, [h.quantile(0.5) for h in histograms], marker="o", ms=3, label="median")
    axis.plot(steps, [h.low for h in histograms], ls=":", lw=1, label="min / max")
    axis.plot(steps, [h.high for h in histograms], ls=":", lw=1, color=axis.lines[-1].get_color())
    axis.set_xlabel("training step")
    axis.set_ylabel("sampling weight (mean 1)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    return figure
