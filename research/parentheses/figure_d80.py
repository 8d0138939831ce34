"""The recipe page's figure: nested score per arm on the confirmation seeds of the d_model-80 configuration.

    python -m research.parentheses.figure_d80 --out docs/recipes/img/parentheses_d80.png

Reads the fresh-seed runs at strength ±4.5 (``direction_check_open_choice_d80_pooled40c16_strength4.5_
scratch_seeds48-79.json``) and their baselines (``sweep_open_choice_d80_baseline_48-63.csv``, ``_64-79``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from recipes.parentheses.report import plot_scores
from recipes.parentheses.sweep import read_rows
from research.parentheses.configs import RESULTS

CHECK = "direction_check_open_choice_d80_pooled40c16_strength4.5_scratch_seeds48-79.json"
BASELINES = ("sweep_open_choice_d80_baseline_48-63.csv", "sweep_open_choice_d80_baseline_64-79.csv")


def rows() -> list[dict[str, object]]:
    """Baseline, ``nested`` (+δ̂) and ``equal`` (−δ̂) runs, one row each, in the sweep's row format."""
    out = [r for name in BASELINES for r in read_rows(RESULTS / name) if r["arm"] == "baseline"]
    for run in json.loads((RESULTS / CHECK).read_text())["runs"]:
        out.append({**run, "arm": "nested" if run["sign"] > 0 else "equal"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs/recipes/img/parentheses_d80.png"))
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(plot_scores(rows(), args.out, order=["equal", "baseline", "nested"]))


if __name__ == "__main__":
    main()
