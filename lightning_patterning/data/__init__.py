"""Weighted training data: a mutable-weight ``DistributedSampler``, DataModule and DataLoader wrappers."""

from lightning_patterning.data.datamodule import PatterningDataModule, resolve_groups, weighted_dataloader
from lightning_patterning.data.sampler import WeightedDistributedSampler
from lightning_patterning.data.token_weights import token_weights, weighted_loss
from lightning_patterning.data.weights import per_sample_weights, validate_groups, validate_weights

__all__ = [
    "PatterningDataModule",
    "WeightedDistributedSampler",
    "per_sample_weights",
    "resolve_groups",
    "token_weights",
    "validate_groups",
    "validate_weights",
    "weighted_dataloader",
    "weighted_loss",
]
