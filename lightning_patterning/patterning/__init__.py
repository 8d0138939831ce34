"""Patterning: invert the linear response to choose data weights (docs/concepts/patterning.md)."""

from lightning_patterning.patterning.gate import GateResult, noise_gate
from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights

__all__ = ["GateResult", "noise_gate", "solve_intervention", "solve_log_weights"]
