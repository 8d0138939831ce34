"""lightning_patterning: LLC, susceptibilities and patterning inside PyTorch Lightning training."""

from lightning_patterning.estimators.llc import LLCResult, estimate_llc
from lightning_patterning.sgld.config import SGLDConfig

__all__ = ["LLCResult", "SGLDConfig", "estimate_llc"]
__version__ = "0.1.0"
