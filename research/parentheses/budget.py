"""How far a re-weighting moves the sampling distribution: KL(weighted ‖ natural) over the groups.

Prints the KL of the reference heuristic and of the LLC route's fixed weights at several strengths (the
Δχ file of the base config, ``Shift({"llc": -1})``, the weight update ``lp.PatterningCallback`` applies),
so that the LLC route can be run at the reference arm's budget:

    python -m research.parentheses.budget --strengths 1.0 2.5
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch

from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.patterning.solve import solve_log_weights
from lightning_patterning.patterning.weights import WeightUpdate
from recipes.parentheses.cli import main as cli_main
from recipes.parentheses.patterning import group_masses, heuristic_weights
from recipes.parentheses.sweep import bare_argv
from research.parentheses.configs import config_args
from research.parentheses.llc_route import delta_chi_path


def kl_to_natural(
    masses: dict[tuple[int, int, int], float], natural: dict[tuple[int, int, int], float]
) -> float:
    """``KL(m ‖ natural) = Σ_g m_g·log(m_g / natural_g)`` over the groups."""
    return sum(m * math.log(m / natural[g]) for g, m in masses.items() if m > 0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="baseline", help="a study configuration (configs.py)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.5])
    args = parser.parse_args(argv)
    with bare_argv():
        cli = cli_main(
            [*config_args(args.config), "--trainer.logger=false"], run=False, save_config_callback=None
        )
    data = cli.datamodule
    train = data.train_set
    natural = group_masses(data, None)
    heuristic = group_masses(data, heuristic_weights(train.strings, train.labels.tolist()))
    print(f"reference_heuristic: KL {kl_to_natural(heuristic, natural):.3f}")
    chi = Susceptibilities.load(delta_chi_path(args.config))
    keys = sorted(natural)
    weights = torch.tensor([natural[k] for k in keys], dtype=torch.float64)
    columns = torch.tensor([int(c) for c in chi.group_names])
    delta = solve_log_weights(
        chi.matrix.double(), torch.tensor([-1.0], dtype=torch.float64), weights[columns]
    )
    dh = torch.zeros_like(weights).index_copy_(0, columns, delta)
    for strength in args.strengths:
        for name, sign in (("llc_route", 1.0), ("llc_route_equal", -1.0)):
            new, _ = WeightUpdate(strength=strength).apply(weights, sign * dh)
            masses = {k: float(m) for k, m in zip(keys, new / new.sum(), strict=True)}
            print(f"{name} strength {strength:g}: KL {kl_to_natural(masses, natural):.3f}")


if __name__ == "__main__":
    main()
