"""lightning_patterning: LLC, susceptibilities and patterning inside PyTorch Lightning training."""

from lightning_patterning.callbacks.llc_callback import LLCCallback
from lightning_patterning.estimators.llc import LLCResult, estimate_llc
from lightning_patterning.sgld.config import SGLDConfig

__all__ = ["LLCCallback", "LLCResult", "SGLDConfig", "estimate_llc"]
__version__ = "0.1.0"
