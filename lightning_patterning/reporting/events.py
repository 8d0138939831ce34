"""Reading a log directory: every TensorBoard run under it, its scalars and histograms, and the
``Susceptibilities`` files ``SusceptibilityCallback`` / ``PatterningCallback`` saved next to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_patterning.estimators.result import Susceptibilities

Series = tuple[list[int], list[float]]
"""``(steps, values)`` of one scalar tag, in step order."""


@dataclass
class Histogram:
    """One histogram event: its step, bucket right edges and counts, and the min/max of the values."""

    step: int
    edges: list[float]
    counts: list[float]
    low: float
    high: float

    def quantile(self, q: float) -> float:
        """Approximate ``q``-quantile (the right edge of the bucket where the cumulative count crosses q)."""
        total = sum(self.counts)
        running = 0.0
        for edge, count in zip(self.edges, self.counts, strict=True):
            running += count
            if total and running >= q * total:
                return min(max(edge, self.low), self.high)
        return self.high


@dataclass
class RunLogs:
    """What one TensorBoard run directory holds."""

    name: str
    path: Path
    scalars: dict[str, Series] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    estimates: dict[str, list[Path]] = field(default_factory=dict)

    def latest_estimate(self, name: str) -> Susceptibilities | None:
        """The last saved estimate of callback ``name`` (``None`` if there is none)."""
        paths = self.estimates.get(name)
        return Susceptibilities.load(paths[-1]) if paths else None


def load_runs(logdir: str | Path) -> list[RunLogs]:
    """Every run (a directory with ``events.out.tfevents.*`` files) under ``logdir``, sorted by path.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no TensorBoard event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"logdir {str(root)!r} is not a directory")
    directories = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not directories:
        raise FileNotFoundError(f"no TensorBoard event files under {str(root)!r}")
    runs = []
    for directory in directories:
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "histograms": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        run = RunLogs(name=str(directory.relative_to(root)) or ".", path=directory)
        for tag in tags.get("scalars", []):
            events = sorted(accumulator.Scalars(tag), key=lambda e: e.step)
            run.scalars[tag] = ([e.step for e in events], [float(e.value) for e in events])
        for tag in tags.get("histograms", []):
            run.histograms[tag] = [
                Histogram(
                    e.step,
                    list(e.histogram_value.bucket_limit),
                    list(e.histogram_value.bucket),
                    float(e.histogram_value.min),
                    float(e.histogram_value.max),
                )
                for e in sorted(accumulator.Histograms(tag), key=lambda e: e.step)
            ]
        for path in sorted(directory.glob("*/step*.pt")):
            run.estimates.setdefault(path.parent.name, []).append(path)
        runs.append(run)
    return runs


def finite(series: Series) -> Series:
    """``series`` without its non-finite values."""
    pairs = [(s, v) for s, v in zip(*series, strict=True) if torch.isfinite(torch.tensor(v))]
    return [s for s, _ in pairs], [v for _, v in pairs]
