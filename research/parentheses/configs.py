"""The configurations the parentheses studies name, as the recipe's base config plus overlays.

The studies' results are named after the configuration they ran on (``baseline``, ``open_choice``,
``open_choice_d80``, …); each name is now the recipe's ``configs/base.yaml`` plus variant overlays, and
resolves to exactly the configuration those results were made with. ``--config`` of every study script
takes such a name, the historical path ``recipes/parentheses/configs/<name>.yaml``, or a YAML path.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_CONFIGS = Path("recipes/parentheses/configs")
BASE = str(RECIPE_CONFIGS / "base.yaml")
VARIANTS = RECIPE_CONFIGS / "variants"
ARMS = Path(__file__).parent / "configs" / "arms"
RESULTS = Path(__file__).parent / "results"

PRESETS: dict[str, tuple[str, ...]] = {
    "baseline": ("bidirectional",),
    "flipped": ("flipped",),
    "close_heavy": ("close_heavy",),
    "causal_last": ("causal_last",),
    "open_choice": ("d64",),
    "open_choice_1400steps": ("d64_1400steps",),
    "open_choice_d80": (),
    "open_choice_d96": ("d96",),
    "open_choice_d128": ("d128",),
}
"""Study configuration name → variant overlays on ``base.yaml``."""


def config_files(config: str) -> list[str]:
    """The YAML files of ``config``: a preset name (or its historical path), or a YAML path."""
    name = Path(config).stem if config.endswith((".yaml", ".yml")) else config
    if name in PRESETS and not Path(config).is_file():
        return [BASE, *(str(VARIANTS / f"{v}.yaml") for v in PRESETS[name])]
    if not Path(config).is_file():
        raise ValueError(f"config {config!r} is neither a study configuration {sorted(PRESETS)} nor a file")
    return [config]


def config_args(config: str) -> list[str]:
    """``["--config", file, …]`` for the recipe's CLI."""
    return [arg for path in config_files(config) for arg in ("--config", path)]


def config_name(config: str) -> str:
    """The name results of ``config`` go by (the preset name or the file's stem)."""
    return Path(config).stem


def arm_path(arm: str) -> str:
    """A study arm: ``research/parentheses/configs/arms/<arm>.yaml`` if it exists, else the recipe's arm."""
    path = ARMS / f"{arm}.yaml"
    return str(path) if path.is_file() else arm
