"""``lightning-patterning demo``: the demo of `make demo`, run from a clone of the repository (it trains
the parentheses recipe, which is not part of the installed package): three seeds of a small transformer
with natural, NESTED-ward and EQUAL-COUNT-ward training weights, plus one online-patterning run; prints
what moved and where the figure, tables, TensorBoard logs and report are."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where results go (default runs/demo)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")


def repository_root(start: Path) -> Path | None:
    """The nearest directory at or above ``start`` that holds ``recipes/parentheses``."""
    for directory in (start, *start.parents):
        if (directory / "recipes" / "parentheses" / "demo.py").is_file():
            return directory
    return None


def run(args: argparse.Namespace) -> int:
    root = repository_root(Path.cwd())
    if root is None:
        print(
            "lightning-patterning demo: run it inside a clone of the lightning_patterning repository "
            "(the demo trains recipes/parentheses, which the installed package does not include)."
        )
        return 2
    command = [sys.executable, "-m", "recipes.parentheses.demo", "--out", args.out, "--jobs", str(args.jobs)]
    return subprocess.call(command, cwd=root)
