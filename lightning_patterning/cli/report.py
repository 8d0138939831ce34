"""``lightning-patterning report LOGDIR [--out DIR]``: a Markdown and an HTML report with figures (estimates
with their bands, susceptibility heatmaps, principal components, sampling weights over time, final
metrics) from every TensorBoard run under LOGDIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_patterning.reporting import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", type=Path, help="a TensorBoard log directory (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default LOGDIR/report)")


def run(args: argparse.Namespace) -> int:
    try:
        markdown = write_report(args.logdir, args.out)
    except FileNotFoundError as error:
        print(f"lightning-patterning report: {error}")
        return 2
    print(f"wrote {markdown} and {markdown.with_suffix('.html')}")
    return 0
