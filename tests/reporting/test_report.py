"""``write_report`` / ``lightning-patterning report`` on logs written the way the callbacks write them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_patterning.cli import main as cli_main
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.reporting import load_runs, write_report


def chi(rows: int, columns: int, seed: int = 0) -> Susceptibilities:
    generator = torch.Generator().manual_seed(seed)
    return Susceptibilities(
        matrix=torch.randn(rows, columns, generator=generator),
        stderr=torch.full((rows, columns), 0.1),
        mu=torch.zeros(rows),
        names=[f"obs{i}" for i in range(rows)],
        kinds=["ProbeLoss"] * rows,
        sample_ids=torch.arange(columns),
        group_names=[str(j) for j in range(columns)],
        group_index=torch.arange(columns),
        nbeta=30.0,
        center_loss=1.0,
        diverged_chains={"full": 0},
        config={},
        metadata={"step": 20},
    )


def write_run(directory: Path, columns: int) -> None:
    """A run as the callbacks log it: LLC mean/std scalars, a weights histogram, a saved χ, final metrics."""
    writer = SummaryWriter(str(directory))
    for step in (10, 20, 30):
        writer.add_scalar("llc/mean", 5.0 + step / 10, step)
        writer.add_scalar("llc/std", 0.5, step)
        writer.add_scalar("train/loss", 1.0 / step, step)
        writer.add_histogram("patterning/weights", torch.linspace(0.5, 1.5, 20) * (1 + step / 100), step)
    writer.add_scalar("final/accuracy", 0.99, 30)
    writer.close()
    chi(3, columns).save(directory / "patterning" / "step00000020.pt")


def test_report_has_the_estimate_band_matrix_components_weights_and_final_metrics(tmp_path: Path) -> None:
    write_run(tmp_path / "logs" / "run_a", columns=6)
    write_run(tmp_path / "logs" / "run_b", columns=2)  # two columns: bars instead of a degenerate heatmap
    run_a, _ = load_runs(tmp_path / "logs")
    assert run_a.scalars["llc/mean"] == ([10, 20, 30], [6.0, 7.0, 8.0])
    assert [h.step for h in run_a.histograms["patterning/weights"]] == [10, 20, 30]
    assert run_a.latest_estimate("patterning").matrix.shape == (3, 6)
    markdown = write_report(tmp_path / "logs", tmp_path / "out")
    text = markdown.read_text()
    figures = {p.name for p in (tmp_path / "out").glob("*.png")}
    assert {"run_a_llc.png", "run_a_patterning_chi.png", "run_a_patterning_pcs.png"} <= figures
    assert {"run_a_patterning_weights.png", "training_loss.png", "run_b_patterning_chi.png"} <= figures
    assert "run_b_patterning_pcs.png" not in figures  # PCs of two columns say nothing
    assert "| run_a | 0.99 |" in text and "![run_a_llc](run_a_llc.png)" in text
    assert "<img src='run_a_llc.png'" in (tmp_path / "out" / "report.html").read_text()


def test_console_report_writes_next_to_the_logs_and_fails_clearly_without_logs(
    tmp_path: Path, capsys
) -> None:
    write_run(tmp_path / "logs" / "run", columns=4)
    assert cli_main(["report", str(tmp_path / "logs")]) == 0
    assert (tmp_path / "logs" / "report" / "report.md").is_file()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    assert "is not a directory" in capsys.readouterr().out


def test_console_help_lists_the_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "report" in out and "demo" in out
