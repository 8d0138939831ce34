"""Patterning: invert the linear response to choose data weights (docs/concepts/patterning.md)."""

from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights

__all__ = ["solve_intervention", "solve_log_weights"]
