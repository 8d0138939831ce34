"""``write_report(logdir, out)``: a Markdown and an HTML page with the figures of every run under ``logdir``.

What goes in, for each run that has it:

* the final scalars (tags ``final/…``) of every run, as one table;
* every estimate logged with a standard deviation (``<name>/mean`` with ``<name>/std``, e.g. the LLC of
  ``LLCCallback``) as a curve over training steps with a ±std band;
* the latest susceptibility matrix each callback saved (``<run>/<name>/step*.pt``) as a heatmap, and its
  data loadings on PC1 and PC2;
* the sampling weights over training (histograms whose tag ends in ``weights``);
* the training loss of all runs (``train/loss`` or ``train_loss``) on one chart.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from lightning_patterning.reporting import figures
from lightning_patterning.reporting.events import RunLogs, finite, load_runs

_LOSS_TAGS = ("train/loss", "train_loss", "train/loss_step", "train_loss_step")


def write_report(logdir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and their PNG figures into ``out`` (default
    ``<logdir>/report``); returns the Markdown file's path.

    Raises:
        FileNotFoundError: ``logdir`` holds no TensorBoard event file.
    """
    runs = load_runs(logdir)
    out = Path(out) if out is not None else Path(logdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks: list[tuple[str, str | Path]] = [("h1", f"Report: {logdir}")]
    blocks += _final_table(runs)
    blocks += _loss_chart(runs, out)
    for run in runs:
        blocks += _run_sections(run, out)
    markdown = out / "report.md"
    markdown.write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks, str(logdir)))
    return markdown


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "run"


def _final_table(runs: list[RunLogs]) -> list[tuple[str, str | Path]]:
    tags = sorted({t for r in runs for t in r.scalars if t.startswith("final/")})
    if not tags:
        return [("p", f"{len(runs)} run(s); none logged `final/…` scalars.")]
    rows = [["run", *(t.removeprefix("final/") for t in tags)]]
    for run in runs:
        cells = [run.name]
        for tag in tags:
            values = run.scalars.get(tag, ([], []))[1]
            cells.append(f"{values[-1]:.4g}" if values and math.isfinite(values[-1]) else "–")
        rows.append(cells)
    return [("h2", "Final metrics"), ("table", _table(rows))]


def _loss_chart(runs: list[RunLogs], out: Path) -> list[tuple[str, str | Path]]:
    series = {}
    for run in runs:
        tag = next((t for t in _LOSS_TAGS if t in run.scalars), None)
        if tag is not None and run.scalars[tag][0]:
            series[run.name] = finite(run.scalars[tag])
    if not series:
        return []
    path = figures.save(figures.curves(series, "training loss", "loss"), out / "training_loss.png")
    return [("h2", "Training loss"), ("img", path)]


def _run_sections(run: RunLogs, out: Path) -> list[tuple[str, str | Path]]:
    """The figures of one run (empty if it has none)."""
    slug = _slug(run.name)
    items: list[tuple[str, str | Path]] = []
    for tag in sorted(run.scalars):
        if not tag.endswith("/mean") or f"{tag[:-5]}/std" not in run.scalars:
            continue
        name = tag[:-5]
        mean, std = finite(run.scalars[tag]), finite(run.scalars[f"{name}/std"])
        if not mean[0]:
            continue
        figure = figures.estimate_with_band(mean, std, f"{run.name}: {name}", ylabel=f"{name} (mean ± std)")
        items.append(("img", figures.save(figure, out / f"{slug}_{_slug(name)}.png")))
    for name in sorted(run.estimates):
        chi = run.latest_estimate(name)
        if chi is None or not bool(chi.matrix.isfinite().all()):
            continue
        step = chi.metadata.get("step", "?")
        title = f"{run.name}: {name}, step {step}"
        items.append(
            ("img", figures.save(figures.susceptibility_matrix(chi, title), out / f"{slug}_{name}_chi.png"))
        )
        scatter = figures.principal_components(chi, title)
        if scatter is not None:
            items.append(("img", figures.save(scatter, out / f"{slug}_{name}_pcs.png")))
    for tag in sorted(run.histograms):
        if tag.endswith("weights") and run.histograms[tag]:
            figure = figures.weights_over_time(run.histograms[tag], f"{run.name}: {tag}")
            items.append(("img", figures.save(figure, out / f"{slug}_{_slug(tag)}.png")))
    return [("h2", f"Run `{run.name}`"), *items] if items else []


def _table(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _markdown(blocks: list[tuple[str, str | Path]]) -> str:
    parts = []
    for kind, value in blocks:
        if kind == "h1":
            parts.append(f"# {value}")
        elif kind == "h2":
            parts.append(f"## {value}")
        elif kind == "img":
            parts.append(f"![{Path(value).stem}]({Path(value).name})")
        else:
            parts.append(str(value))
    return "\n\n".join(parts) + "\n"


def _html(blocks: list[tuple[str, str | Path]], title: str) -> str:
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style>",
    ]
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(str(value)).replace('`', '')}</{kind}>")
        elif kind == "img":
            parts.append(f"<p><img src='{html.escape(Path(value).name)}' alt='{Path(value).stem}'></p>")
        elif kind == "table":
            rows = [
                line.strip("|").split("|") for line in str(value).splitlines() if not line.startswith("|---")
            ]
            cells = "".join(
                "<tr>"
                + "".join(
                    f"<{'th' if i == 0 else 'td'}>{html.escape(c.strip())}</{'th' if i == 0 else 'td'}>"
                    for c in row
                )
                + "</tr>"
                for i, row in enumerate(rows)
            )
            parts.append(f"<div style='overflow-x:auto'><table>{cells}</table></div>")
        else:
            parts.append(f"<p>{html.escape(str(value))}</p>")
    return "\n".join(parts) + "\n"
