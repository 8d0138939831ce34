"""Shared pieces of the parentheses tests: config paths, small data, a tiny model and tiny CLI overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes.parentheses.data import ParenthesesData
from recipes.parentheses.model import ParenthesesClassifier

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "parentheses" / "configs"
BASE = CONFIGS / "base.yaml"
BIDIRECTIONAL = CONFIGS / "variants" / "bidirectional.yaml"
"""The first configuration studied (the studies' ``baseline``): base.yaml plus this overlay."""


def small_data(**kwargs: object) -> ParenthesesData:
    settings = {"n_train": 2000, "n_val": 200, "n_ood_test": 300, "n_ood_probe": 100, "max_length": 12}
    settings.update(kwargs)
    return ParenthesesData(**settings)  # type: ignore[arg-type]


def tiny_model(seed: int = 0) -> ParenthesesClassifier:
    torch.manual_seed(seed)
    return ParenthesesClassifier(d_model=16, n_layers=1, n_heads=2, d_mlp=16, max_length=12)


TINY = [
    "--trainer.max_steps=3",
    "--trainer.enable_progress_bar=false",
    "--model.d_model=16",
    "--model.d_mlp=16",
    "--model.n_heads=2",
    "--model.n_layers=1",
    "--data.n_train=256",
    "--data.n_val=64",
    "--data.n_ood_test=64",
    "--data.n_ood_probe=16",
    "--data.batch_size=32",
]


def merged(*paths: Path) -> dict:
    """The YAML files deep-merged in order (later keys win), as LightningCLI reads several --config."""
    yaml = pytest.importorskip("yaml")

    def merge(into: dict, new: dict) -> dict:
        for key, value in new.items():
            into[key] = merge(into.get(key, {}), value) if isinstance(value, dict) else value
        return into

    config: dict = {}
    for path in paths:
        merge(config, yaml.safe_load(path.read_text()))
    return config


def tiny_config(tmp_path: Path, max_steps: int, n_train: int, n_ood_probe: int) -> Path:
    """The studies' baseline config shrunk to a one-layer d_model-16 model, strings ≤ 12 long, no logger."""
    yaml = pytest.importorskip("yaml")
    config = merged(BASE, BIDIRECTIONAL)
    config["trainer"].update(max_steps=max_steps, logger=False, enable_progress_bar=False)
    config["model"].update(d_model=16, d_mlp=16, n_heads=2, n_layers=1, max_length=12)
    config["data"].update(
        n_train=n_train, n_val=64, n_ood_test=64, n_ood_probe=n_ood_probe, batch_size=32, max_length=12
    )
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump(config))
    return base
