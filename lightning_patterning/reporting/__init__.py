"""Reports from a run's logs: TensorBoard event files and saved estimates → figures, Markdown and HTML."""

from lightning_patterning.reporting.events import RunLogs, load_runs
from lightning_patterning.reporting.report import write_report

__all__ = ["RunLogs", "load_runs", "write_report"]
