"""The progress bar of an SGLD run inside a Trainer: labelled with the callback and the step, shown only
where the Trainer shows its own bar, and drawn by that bar's library."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from lightning_patterning.sgld.chains import Progress


def sgld_progress(trainer: pl.Trainer, enabled: bool, label: str) -> Progress:
    """What the chain runner gets as ``progress``: nothing unless ``enabled``, on rank 0, and the Trainer
    shows a progress bar (``Trainer(enable_progress_bar=False)`` hides ours too). Next to Lightning's
    ``TQDMProgressBar`` a tqdm bar labelled ``label``; next to ``RichProgressBar`` a task in its own live
    display (a tqdm bar would garble it); next to any other bar, none."""
    bar = trainer.progress_bar_callback
    if not enabled or not trainer.is_global_zero or bar is None:
        return False
    if isinstance(bar, TQDMProgressBar):
        return label
    if isinstance(bar, RichProgressBar) and bar.progress is not None:
        return partial(_rich_steps, bar, label)
    return False


def _rich_steps(bar: RichProgressBar, label: str, steps: range, details: str) -> Iterator[int]:
    """``steps``, advancing a task of ``bar``'s live display; the task is removed at the end."""
    progress = bar.progress
    assert progress is not None
    task = progress.add_task(f"{label} {details}", total=len(steps))
    try:
        for done, step in enumerate(steps, start=1):
            yield step
            progress.update(task, completed=done)
            bar.refresh()
    finally:
        progress.remove_task(task)
        bar.refresh()
