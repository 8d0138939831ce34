"""Patterning: invert the linear response to choose data weights (SCIENCE.md §4)."""

from lightning_patterning.patterning.solve import solve_intervention

__all__ = ["solve_intervention"]
