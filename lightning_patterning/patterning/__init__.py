"""Patterning: invert the linear response to choose data weights (docs/concepts/patterning.md)."""

from lightning_patterning.patterning.gate import GateResult, noise_gate
from lightning_patterning.patterning.solve import solve_intervention, solve_log_weights
from lightning_patterning.patterning.tokens import (
    TokenWeightRule,
    class_means,
    heldout_correlation,
    probe_token_classes,
    solve_token_dh,
    token_patterning_step,
    update_token_rule,
    weighted_mean,
)
from lightning_patterning.patterning.weights import WeightUpdate

__all__ = [
    "GateResult",
    "TokenWeightRule",
    "WeightUpdate",
    "class_means",
    "heldout_correlation",
    "noise_gate",
    "probe_token_classes",
    "solve_intervention",
    "solve_log_weights",
    "solve_token_dh",
    "token_patterning_step",
    "update_token_rule",
    "weighted_mean",
]
