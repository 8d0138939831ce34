"""lightning_patterning: LLC, susceptibilities and patterning inside PyTorch Lightning training."""

from lightning_patterning import observables
from lightning_patterning.callbacks.llc_callback import LLCCallback
from lightning_patterning.callbacks.patterning_callback import PatterningCallback
from lightning_patterning.callbacks.susceptibility_callback import SusceptibilityCallback
from lightning_patterning.data.datamodule import PatterningDataModule
from lightning_patterning.data.sampler import WeightedDistributedSampler
from lightning_patterning.data.token_weights import weighted_loss
from lightning_patterning.estimators.llc import LLCResult, estimate_llc
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.estimators.susceptibilities import estimate_susceptibilities
from lightning_patterning.patterning import targets
from lightning_patterning.patterning.tokens import TokenWeightRule
from lightning_patterning.sgld.config import SGLDConfig

__all__ = [
    "LLCCallback",
    "LLCResult",
    "PatterningCallback",
    "PatterningDataModule",
    "SGLDConfig",
    "Susceptibilities",
    "SusceptibilityCallback",
    "TokenWeightRule",
    "WeightedDistributedSampler",
    "estimate_llc",
    "estimate_susceptibilities",
    "observables",
    "targets",
    "weighted_loss",
]
__version__ = "0.1.0"
