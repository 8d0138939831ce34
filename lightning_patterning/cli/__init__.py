"""The ``lightning-patterning`` console tool: ``report LOGDIR``, ``demo``, ``calibrate``.

Each subcommand is a module of this package with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "report": "turn a run's TensorBoard logs into a Markdown + HTML report with figures",
    "demo": "run the demo (the same as `make demo`): patterning moves which algorithm a model learns",
    "calibrate": "choose SGLD settings (lr, nβ) for a model by a grid of short chains",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-patterning",
        description="LLC, susceptibilities and patterning for PyTorch Lightning: tools.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"lightning_patterning.cli.{name}")
        except ModuleNotFoundError:
            continue
        sub = commands.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
