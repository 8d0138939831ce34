"""The LightningCLI how-to's example (docs/how-to/lightningcli.md) runs as the docs show it."""

from __future__ import annotations

from pathlib import Path

import pytest

import lightning_patterning as lp

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "lightningcli" / "config.yaml"


def test_yaml_configured_callbacks_fit_and_move_weight_toward_the_probed_source(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from examples.lightningcli.__main__ import main

    cli = main(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert cli.trainer.global_step == 60
    data = cli.datamodule
    assert isinstance(data, lp.PatterningDataModule)
    llc, patterning = (
        c for c in cli.trainer.callbacks if isinstance(c, lp.LLCCallback | lp.PatterningCallback)
    )
    assert len(llc.history) == 3 and len(patterning.history) == 3
    updates = [row for row in patterning.history if row["active"]]
    assert updates, "the noise gate let no update through"
    assert all(row["predicted_dmu/source1"] < 0 for row in updates)  # each update lowers the probe loss
    mass = data.weights / data.weights.sum()
    assert (
        float(mass[1]) > 0.25
    )  # source 1 starts at its natural share 200 / 800; lowering its loss adds mass
