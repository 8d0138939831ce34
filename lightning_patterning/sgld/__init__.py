"""Localized SGLD: configuration, weight restrictions and the chain engine."""

from lightning_patterning.sgld.chains import ChainRunner, ChainRunSummary, DrawRecord
from lightning_patterning.sgld.config import SGLDConfig, default_nbeta
from lightning_patterning.sgld.restrict import ParamMasks, resolve_param_masks

__all__ = [
    "ChainRunSummary",
    "ChainRunner",
    "DrawRecord",
    "ParamMasks",
    "SGLDConfig",
    "default_nbeta",
    "resolve_param_masks",
]
