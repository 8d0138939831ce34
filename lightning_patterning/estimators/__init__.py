"""Estimators built on the chain engine."""

from lightning_patterning.estimators.llc import LLCResult, estimate_llc

__all__ = ["LLCResult", "estimate_llc"]
