"""The recipe's sweep on a study configuration, with the studies' arms and results folder.

    python -m research.parentheses.sweep --config open_choice_d80 --arms baseline \\
        --seed-list 64 65 66 --name open_choice_d80_baseline_64-66 --jobs 2

``--config`` names a study configuration (``configs.PRESETS``), an arm is a study arm
(``research/parentheses/configs/arms/``: ``llc_route``, ``reference_heuristic``, …) or a recipe arm, the
results go to ``research/parentheses/results/`` and the TensorBoard logs to
``lightning_logs/parentheses/<config>/``. A seed counts as NESTED above 0.9 on the ``open_choice*``
configurations and above 0.5 on the others. The ``llc_route`` arms read the configuration's Δχ file
(``delta_chi_<config>.json``; ``python -m research.parentheses.llc_route --config …`` makes it). Every other
option is the recipe sweep's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recipes.parentheses.sweep import main as recipe_sweep
from research.parentheses.configs import RESULTS, arm_path, config_files, config_name
from research.parentheses.llc_route import delta_chi_path


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--config", default="baseline", help="a study configuration (configs.PRESETS)")
    parser.add_argument("--arms", nargs="+", default=["baseline"])
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    name = config_name(args.config)
    forwarded = [arg for path in config_files(args.config) for arg in ("--config", path)]
    forwarded += ["--arms", *(arm_path(a) for a in args.arms)]
    forwarded += ["--nested-above", "0.9" if name.startswith("open_choice") else "0.5"]
    if any(a.startswith("llc_route") for a in args.arms):
        path = delta_chi_path(args.config)
        if not path.exists():
            parser.error(f"{path} does not exist: make it with python -m research.parentheses.llc_route")
        forwarded += [f"--set=trainer.callbacks.init_args.susceptibilities={path}"]
    defaults = ["--results-dir", str(RESULTS), "--log-dir", f"lightning_logs/parentheses/{name}"]
    defaults += ["--name", name]
    return recipe_sweep([*defaults, *forwarded, *rest])


if __name__ == "__main__":
    main()
