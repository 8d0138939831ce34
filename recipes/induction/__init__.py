"""Induction-circuit recipe (Wang & Murfet 2026, arXiv 2601.13548):
a 2-layer attention-only byte-level language model trained
on Python standard-library source, its 16 per-head observables, and the repeated-sequence probe."""

from recipes.induction.data import WindowDataset, byte_windows, repeated_halves, stdlib_text
from recipes.induction.model import AttentionOnlyTransformer, InductionLM

__all__ = [
    "AttentionOnlyTransformer",
    "InductionLM",
    "WindowDataset",
    "byte_windows",
    "repeated_halves",
    "stdlib_text",
]
