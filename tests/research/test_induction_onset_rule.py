"""The induction study's onset-rule analysis (research/induction/onset_rule.py) on synthetic curves."""

from __future__ import annotations

import pytest

from research.induction.onset_rule import analyse, drop


def _report(seed: int, onset: int, low: float = -4.0) -> dict[str, object]:
    steps = list(range(50, 3001, 50))
    history = [
        {
            "step": s,
            "icl/random": -0.1 if s < onset else low,
            "icl/natural": 0.05 if s < onset else -0.65,
            "heads/prev_max": min(1.0, s / onset),
            "heads/prefix_max": 0.02 if s < onset else 0.8,
            "val/loss": 2.0,
        }
        for s in steps
    ]
    return {"seed": seed, "history": history, "wall_seconds": 100.0, "cpu_seconds": 90.0}


def test_drop_finds_the_step_and_the_midpoint_of_a_sharp_fall() -> None:
    steps = list(range(50, 2001, 50))
    scores = [-0.1 if s < 1000 else -4.1 for s in steps]
    found = drop(steps, scores)
    assert found["end_step"] == 1000 and found["fall"] == pytest.approx(-4.0)
    assert (found["before"], found["after"], found["midpoint"]) == pytest.approx((-0.1, -4.1, -2.1))


def test_analysis_proposes_rounded_thresholds_and_onsets_and_checkpoints() -> None:
    reports = [_report(1000 + i, onset) for i, onset in enumerate([1000, 1200, 1400, 1600])]
    result = analyse(reports)
    random, natural = result["probes"]["random"], result["probes"]["natural"]
    assert random["threshold"] == -2.0 and natural["threshold"] == pytest.approx(-0.3)
    assert [o["step"] for o in random["onsets"]] == [1000, 1200, 1400, 1600]
    assert random["onset_summary"]["median"] == 1300 and random["censored"] == 0
    assert result["checkpoints"][0.5]["step"] == 650  # 50 · floor(0.5 · 1300 / 50)
    assert all(r["icl/random"] == -0.1 for r in result["checkpoints"][0.5]["runs"])
