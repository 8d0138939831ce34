"""The parentheses studies (research/parentheses): the LLC route's Δχ, direction checks, trajectories,
response maps and validity, on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lightning_patterning as lp
from recipes.parentheses.data import (
    boundary_violation,
    count_imbalance,
)
from tests.recipes.parentheses_helpers import TINY, small_data, tiny_config, tiny_model


def test_make_delta_chi_end_to_end(tmp_path: Path) -> None:
    """The LLC route's first stage on a tiny model: two reference solutions, χ(LLC) per group, Δχ file."""
    pytest.importorskip("jsonargparse")
    from lightning_patterning.estimators.result import Susceptibilities
    from research.parentheses.llc_route import make_delta_chi

    sgld = dict(lr=1e-4, nbeta=30.0, localization=300.0, num_chains=2, num_draws=4, batch_size=16)
    out = tmp_path / "delta.json"
    summary = make_delta_chi(
        "baseline", out, n_extra=32, probe_size=64, seeds=(0, 1), overrides=TINY, sgld=sgld
    )
    loaded = Susceptibilities.load(out)
    assert loaded.names == ["llc"] and loaded.matrix.shape == (1, len(loaded.group_names))
    assert torch.isfinite(loaded.matrix).all() and loaded.metadata["seeds"] == 2
    assert set(summary) >= {"seed0", "seed1", "delta_chi_by_group", "seed_to_seed_correlation"}
    assert set(summary["seed0"]) == {"nested", "equal"}


def test_calibrate_reports_every_setting_for_both_references() -> None:
    pytest.importorskip("jsonargparse")
    from research.parentheses.llc_route import calibrate

    sgld = dict(lr=1e-4, nbeta=30.0, localization=300.0, num_chains=2, num_draws=4, batch_size=16)
    grid = [{"nbeta": 10.0}, {"nbeta": 100.0, "localization": 10.0}]
    table = calibrate("baseline", grid, sgld=sgld, overrides=TINY)
    assert [row["setting"] for row in table["grid"]] == grid
    for row in table["grid"]:
        for algorithm in ("nested", "equal"):
            assert math.isfinite(row[algorithm]["llc"]) and row[algorithm]["diverged"] == 0


def test_delta_chi_round_trips(tmp_path: Path) -> None:
    from lightning_patterning.estimators.result import Susceptibilities
    from research.parentheses.llc_route import average_delta_chi, delta_chi

    def fake(values: list[float], mu: float) -> Susceptibilities:
        return Susceptibilities(
            matrix=torch.tensor([values], dtype=torch.float64),
            stderr=torch.full((1, len(values)), 0.1, dtype=torch.float64),
            mu=torch.tensor([mu], dtype=torch.float64),
            names=["llc"],
            kinds=["LLC"],
            sample_ids=torch.arange(6),
            group_names=["0", "1", "2"],
            group_index=torch.tensor([0, 0, 1, 1, 2, 2]),
            nbeta=30.0,
            center_loss=0.01,
            diverged_chains={"full": 0},
            config={"lr": 1e-4},
        )

    delta = delta_chi(fake([1.0, 2.0, 3.0], 5.0), fake([0.5, 2.5, 1.0], 7.0))
    path = delta.save(tmp_path / "delta.json")
    loaded = Susceptibilities.load(path)
    assert loaded.names == ["llc"] and loaded.group_names == ["0", "1", "2"]
    assert loaded.matrix.tolist() == [[0.5, -0.5, 2.0]] and float(loaded.mu[0]) == -2.0
    assert loaded.stderr[0, 0].item() == pytest.approx(math.sqrt(0.02))
    assert loaded.metadata["llc_nested"] == 5.0

    other = delta_chi(fake([3.0, 2.0, 1.0], 6.0), fake([0.5, 0.5, 0.5], 6.0))
    mean = average_delta_chi([delta, other])  # mean of the seeds' Δχ, errors combined √Σse²/k
    assert mean.matrix.tolist() == [[1.5, 0.5, 1.25]] and float(mean.mu[0]) == -1.0
    assert mean.stderr[0, 0].item() == pytest.approx(math.sqrt(0.02 + 0.02) / 2)
    assert average_delta_chi([delta]) is delta


def test_direction_check_combine_pools_runs_of_the_same_direction(tmp_path: Path, monkeypatch) -> None:
    from research.parentheses import direction_check

    monkeypatch.setattr(direction_check, "RESULTS", tmp_path)

    def part(name: str, seeds: list[int], delta: list[float]) -> None:
        runs = [
            {"seed": s, "sign": sign, "nested_score": 0.5 + 0.1 * sign * (s % 2), "accuracy": 1.0}
            for s in seeds
            for sign in (1, -1)
        ]
        result = {"command": "x", "strength": 1.5, "estimates": [], "runs": runs, "mean_delta": delta}
        (tmp_path / f"direction_check_{name}.json").write_text(json.dumps(result))

    part("a", [1, 2], [1.0, -0.5])
    part("b", [3, 4], [1.0, -0.5])
    part("other", [5], [0.5, -1.0])
    direction_check.main(["--combine", "a", "b", "--name", "ab"])
    pooled = json.loads((tmp_path / "direction_check_ab.json").read_text())
    assert sorted({r["seed"] for r in pooled["runs"]}) == [1, 2, 3, 4]
    assert "--combine a b" in pooled["command"]
    assert "2 / 4 seeds up" in (tmp_path / "direction_check_ab.md").read_text()
    with pytest.raises(SystemExit):
        direction_check.main(["--combine", "a", "other", "--name", "bad"])
    for name, seeds, step in (("br1", [1], 150), ("br2", [2], 150), ("br3", [3], 300)):
        runs = [
            {"seed": s, "sign": sign, "nested_score": 0.5, "accuracy": 1.0} for s in seeds for sign in (1, -1)
        ]
        estimates = [{"seed": s} for s in seeds]
        result = {"command": "x", "strength": 1.5, "estimates": estimates, "runs": runs, "branch_step": step}
        (tmp_path / f"direction_check_{name}.json").write_text(json.dumps(result))
    monkeypatch.setattr(direction_check, "summarize", lambda result: "")
    direction_check.main(["--combine", "br1", "br2", "--name", "br"])
    pooled = json.loads((tmp_path / "direction_check_br.json").read_text())
    assert [e["seed"] for e in pooled["estimates"]] == [1, 2] and pooled["branch_step"] == 150
    with pytest.raises(SystemExit):
        direction_check.main(["--combine", "br1", "br3", "--name", "bad"])


def test_direction_check_baseline_scores_merge_sweep_csvs_and_refuse_a_seed_twice(tmp_path: Path) -> None:
    from research.parentheses.direction_check import baseline_scores

    def sweep_csv(name: str, rows: list[tuple[str, int, float]]) -> Path:
        path = tmp_path / name
        lines = ["arm,seed,nested_score"] + [f"{arm},{seed},{score}" for arm, seed, score in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    first = sweep_csv("a.csv", [("baseline", 0, 0.25), ("probe_oneoff", 0, 0.9), ("baseline", 1, 0.5)])
    second = sweep_csv("b.csv", [("baseline", 18, 0.75)])
    assert baseline_scores(None) == {}
    assert baseline_scores([first, second]) == {"baseline": {"0": 0.25, "1": 0.5, "18": 0.75}}
    with pytest.raises(ValueError, match="seed 0"):
        baseline_scores([first, first])


def test_direction_check_summary_counts_pure_nested_seeds_against_the_baseline() -> None:
    from research.parentheses.direction_check import p_value, summarize

    plus, minus, baseline = [0.95, 0.95, 0.95, 0.2], [0.1, 0.1, 0.1, 0.95], [0.95, 0.2, 0.2, 0.2]
    runs = [
        {"seed": seed, "sign": sign, "nested_score": scores[seed], "accuracy": 1.0}
        for seed in range(4)
        for sign, scores in ((1, plus), (-1, minus))
    ]
    result = {"command": "x", "strength": 1.5, "estimates": [], "runs": runs}
    table = summarize({**result, "baseline": {str(seed): b for seed, b in enumerate(baseline)}})
    # Fisher [[3, 1], [1, 3]]: tables as unlikely as it (16/70 each) or less: (1 + 16 + 16 + 1) / 70
    assert (
        "+δ̂ 3, −δ̂ 1, baseline 1 of 4; Fisher exact p against the baseline 0.4857 (+δ̂), 1.0000 (−δ̂)" in table
    )
    assert "pure NESTED" not in summarize(result)
    assert p_value(0.01234) == "0.0123" and p_value(3.14e-5) == "3.1e-05"


def test_direction_check_summary_lists_each_pair_of_a_few_estimates() -> None:
    from research.parentheses.direction_check import summarize

    def estimate(seed: int, delta: list[float]) -> dict:
        return {
            "seed": seed,
            "groups": [[0, 2, 0], [1, 1, 0], [1, 2, 0]],
            "mass": [0.5, 0.3, 0.2],
            "heuristic_log_ratio": [-0.9, -0.2, 0.2],
            "chi": [[0.1, 0.2, 0.3], [-0.1, -0.2, -0.3]],
            "stderr": [[0.01] * 3],
            "delta": delta,
            "rows": ["ood", "dyck"],
        }

    deltas = [[1.0, 2.0, 3.0], [2.0, 4.0, 7.0], [-1.0, -2.0, -3.0]]
    result = {"command": "x", "strength": 1.5, "runs": [], "estimates": []}
    table = summarize({**result, "estimates": [estimate(s, d) for s, d in enumerate(deltas)]})
    assert "- δ of seed 0 vs seed 2: correlation -1.00" in table
    # corr([1, 2, 3], [2, 4, 7]) = 5 / sqrt(2 · 38/3) = 0.993
    assert "- δ of seed 0 vs seed 1: correlation +0.99" in table and "mean pairwise correlation" in table
    table = summarize({**result, "estimates": [estimate(s, deltas[s % 3]) for s in range(5)]})
    assert "mean pairwise correlation" in table and "δ of seed" not in table


def test_trajectory_recorder_records_the_probe_losses_at_the_requested_steps() -> None:
    import lightning as L

    from recipes.parentheses.data import collate_trimmed as collate
    from research.parentheses.trajectory import TrajectoryRecorder, probe_loss, summarize

    data, model = small_data(), tiny_model()
    with torch.no_grad():
        start_ood = model.per_sample_loss([data.ood_probe_nested.tokens, data.ood_probe_nested.labels])
    recorder = TrajectoryRecorder(data, (0, 2, 3))
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    loader = torch.utils.data.DataLoader(data.train_set, batch_size=32, collate_fn=collate)
    trainer.fit(model, loader)
    assert [row["step"] for row in recorder.rows] == [0, 2, 3]
    assert recorder.rows[0]["ood_loss"] == pytest.approx(start_ood.mean().item(), rel=1e-5)
    assert recorder.rows[-1]["dyck_loss"] == pytest.approx(probe_loss(model, data.dyck_probe))
    assert model.training and all(0.0 <= row["nested_score"] <= 1.0 for row in recorder.rows)
    rows = {
        sign: [{**row, "ood_loss": row["ood_loss"] - sign} for row in recorder.rows] for sign in (1, -1, 0)
    }
    runs = [{"seed": s, "sign": sign, "rows": rows[sign]} for s in (0, 1) for sign in (1, -1, 0)]
    table = summarize({"check": "c", "strength": 1.0, "command": "x", "runs": runs})
    assert "| 3 | ood_loss |" in table and "-2.0000 [" in table
    baseline_runs = [run for run in runs if run["sign"] == 0]
    table = summarize({"check": None, "strength": 0.0, "command": "x", "runs": baseline_runs})
    ood_at_3 = f"| 3 | ood_loss | {recorder.rows[-1]['ood_loss']:.4f} |"
    assert "baseline runs" in table and ood_at_3 in table and "+δ̂" not in table
    assert "Window rule" in table


def test_the_window_rule_takes_the_last_step_not_yet_correlated_with_the_final_score() -> None:
    from research.parentheses.trajectory import window_step

    assert window_step({5: 0.24, 10: -0.29, 40: -0.37, 80: 0.35, 150: 0.53}) == 40
    assert window_step({5: 0.1, 40: 0.6, 80: 0.2, 150: 0.9}) == 80
    assert window_step({5: float("nan"), 10: 0.2, 20: float("nan")}) == 10
    assert window_step({5: 0.5, 10: 0.9}) is None


def test_trajectory_records_the_last_step_of_any_schedule() -> None:
    from research.parentheses.trajectory import recording_steps

    assert recording_steps(700) == (0, 5, 10, 20, 40, 80, 150, 300, 500, 700)
    assert recording_steps(1400)[-3:] == (700, 1000, 1400)
    assert recording_steps(600)[-2:] == (500, 600)


def test_trajectory_combine_pools_runs_of_the_same_check(tmp_path: Path, monkeypatch) -> None:
    from research.parentheses import trajectory

    monkeypatch.setattr(trajectory, "RESULTS", tmp_path)
    row = {"step": 0, "ood_loss": 0.5, "dyck_loss": 0.5, "nested_score": 0.5, "accuracy": 1.0}

    def part(name: str, seeds: list[int], check: str) -> None:
        runs = [{"seed": s, "sign": sign, "rows": [row]} for s in seeds for sign in (1, -1, 0)]
        result = {"command": "x", "check": check, "strength": 1.5, "runs": runs}
        (tmp_path / f"trajectory_{name}.json").write_text(json.dumps(result))

    part("a", [1, 2], "c")
    part("b", [3], "c")
    part("other", [4], "d")
    trajectory.main(["--combine", "a", "b", "--name", "ab"])
    pooled = json.loads((tmp_path / "trajectory_ab.json").read_text())
    assert sorted({r["seed"] for r in pooled["runs"]}) == [1, 2, 3]
    assert "3 seeds" in (tmp_path / "trajectory_ab.md").read_text()
    with pytest.raises(SystemExit):
        trajectory.main(["--combine", "a", "other", "--name", "bad"])


def test_branch_runs_are_the_baseline_run_until_the_branch_step(tmp_path: Path) -> None:
    """``weighted_cli(from_step=k)``: natural weights up to step k, the new weights after it (applied from the
    sampler's next chunk of 256 indices: 8 batches of 32 here)."""
    from recipes.parentheses.patterning import group_keys
    from research.parentheses import direction_check

    base = tiny_config(tmp_path, max_steps=12, n_train=256, n_ood_probe=16)
    ids, names = group_keys(small_data(n_train=256, max_length=12).train_set)
    change = {tuple(n): (1.0 if n[0] == 1 else -1.0) for n in names}

    def run(**kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        cli = direction_check.weighted_cli(str(base), 0, change, **kwargs)  # type: ignore[arg-type]
        direction_check.causal_run(cli, 0, 1)
        return cli.datamodule.weights, torch.cat([p.detach().flatten() for p in cli.model.parameters()])

    natural = torch.bincount(torch.tensor(ids)).double()
    expected = natural * torch.exp(torch.tensor([change[tuple(n)] for n in names], dtype=torch.float64))
    baseline_weights, baseline_params = run(sign=1, strength=0.0)
    torch.testing.assert_close(baseline_weights / baseline_weights.sum(), natural / natural.sum())
    weights, params = run(sign=1, strength=1.0, from_step=12)  # switched after the last step
    torch.testing.assert_close(weights / weights.sum(), expected / expected.sum())
    assert torch.equal(params, baseline_params)
    weights, params = run(sign=1, strength=1.0, from_step=2)
    torch.testing.assert_close(weights / weights.sum(), expected / expected.sum())
    assert not torch.equal(params, baseline_params)


@pytest.mark.slow  # generates 4,000-string data sets three times (~20 s on an idle core)
def test_near_balanced_false_probe_is_held_out_in_distribution_false_strings() -> None:
    data = small_data()
    probe = data.near_balanced_false_probe
    training = set(data.train_set.strings)
    assert len(set(probe.strings)) == len(probe) == data.n_ood_probe and bool((probe.labels == 0).all())
    for s in probe.strings:
        assert count_imbalance(s) == 2 and 10 <= len(s) <= data.max_length and s not in training
    assert probe.strings == small_data().near_balanced_false_probe.strings  # deterministic in the data seed
    with pytest.raises(ValueError, match="n_ood_probe"):  # length 10 has too few such strings off training
        _ = small_data(n_train=4000, max_length=10, n_ood_probe=5000).near_balanced_false_probe


def test_validity_controlled_estimate_holds_both_control_rows_fixed(tmp_path: Path) -> None:
    """With ``validity_control`` the estimate has a third row and its direction changes, to first order,
    the OOD probe loss only: ``χ̃·M·δ`` (the solve's model of ``dμ``) is ``(−c, 0, 0)`` with ``c > 0``."""
    from research.parentheses import direction_check

    base = tiny_config(tmp_path, max_steps=4, n_train=512, n_ood_probe=32)
    sgld = lp.SGLDConfig(lr=1e-4, nbeta=30.0, localization=300.0, num_chains=2, num_draws=8, batch_size=32)
    result = direction_check.estimate(str(base), 0, 2, 4, sgld, validity_control=True)
    assert result["rows"] == ["ood_nested", "dyck", "near_balanced_false"]
    chi = torch.tensor(result["chi"], dtype=torch.float64)
    mass = torch.tensor(result["mass"], dtype=torch.float64)
    mass = mass / mass.sum()
    delta = torch.tensor(result["delta"], dtype=torch.float64)
    response = (chi - (chi @ mass)[:, None]) @ (mass * delta)
    assert response[0] < 0
    torch.testing.assert_close(
        response[1:], torch.zeros(2, dtype=torch.float64), atol=1e-9 * response.abs().max(), rtol=0
    )


def test_interior_probe_keeps_only_ood_strings_the_ends_cannot_give_away() -> None:
    from research.parentheses.direction_check import probe_set

    data = small_data()
    everything, interior = probe_set(data, "ood"), probe_set(data, "interior")
    assert everything is data.ood_probe_nested
    kept = interior.strings
    assert 0 < len(kept) < len(everything.strings) and set(kept) <= set(everything.strings)
    assert not any(boundary_violation(s) for s in kept) and bool((interior.labels == 0).all())
    assert sum(not boundary_violation(s) for s in everything.strings) == len(kept)
    with pytest.raises(ValueError, match="probe"):
        probe_set(data, "boundary")


def test_direction_check_tests_the_mean_of_earlier_estimates_from_a_given_step(
    tmp_path: Path, monkeypatch
) -> None:
    from research.parentheses import direction_check

    monkeypatch.setattr(direction_check, "RESULTS", tmp_path)
    groups = [[0, 2, 0], [1, 1, 0]]
    estimates = [
        {"seed": 0, "groups": groups, "delta": [1.0, -0.5]},
        {"seed": 1, "groups": groups, "delta": [0.5, -1.0]},
    ]
    (tmp_path / "direction_check_est.json").write_text(json.dumps({"estimates": estimates}))
    calls: list[tuple] = []

    def fake_cli(
        base: str, seed: int, log_weights: dict, sign: int, strength: float, from_step: int
    ) -> tuple:
        calls.append((seed, log_weights, sign, strength, from_step))
        return seed, sign

    def fake_run(cli: tuple, seed: int, sign: int) -> dict:
        return {"seed": seed, "sign": sign, "nested_score": 0.5 + 0.1 * sign, "accuracy": 1.0}

    monkeypatch.setattr(direction_check, "weighted_cli", fake_cli)
    monkeypatch.setattr(direction_check, "causal_run", fake_run)
    monkeypatch.setattr(direction_check, "summarize", lambda result: "")
    argv = ["--estimates-from", "est", "--from-step", "150", "--test-seeds", "5", "6", "--strength", "2"]
    direction_check.main([*argv, "--name", "pooled"])
    result = json.loads((tmp_path / "direction_check_pooled.json").read_text())
    assert result["mean_delta"] == [1.0, -1.0] and result["from_step"] == 150  # mean (0.75, −0.75), scaled
    assert [e["seed"] for e in result["estimates"]] == [0, 1]
    assert calls == [
        (s, {(0, 2, 0): 1.0, (1, 1, 0): -1.0}, sign, 2.0, 150) for s in (5, 6) for sign in (1, -1)
    ]
    direction_check.main([*argv[:2], "--test-seeds", "7", "--strength", "2", "--name", "scratch"])
    with pytest.raises(SystemExit):  # same direction and strength, but applied from another step
        direction_check.main(["--combine", "pooled", "scratch", "--name", "bad"])
    with pytest.raises(SystemExit):
        direction_check.main(["--branch", "--from-step", "150", "--name", "bad"])


def test_response_map_recovers_a_planted_long_run_gradient(tmp_path: Path, monkeypatch) -> None:
    """Pairs whose y is ⟨G, d⟩ for a planted G: the candidate equal to G correlates at +1 with the smallest
    permutation p, one orthogonal to G does not correlate, and least squares returns G."""
    from lightning_patterning.estimators.result import Susceptibilities
    from research.parentheses import response_map

    monkeypatch.setattr(response_map, "RESULTS", tmp_path)
    monkeypatch.setattr(response_map, "PERMUTATIONS", 2000)
    names = [(0, 2, 0), (0, 4, 0), (1, 1, 0), (1, 2, 0)]
    planted = torch.tensor([0.3, -0.1, -0.4, 0.2], dtype=torch.float64)
    orthogonal = torch.tensor([0.0, 2.0, -1.0, -1.0], dtype=torch.float64)
    assert float(planted @ orthogonal) == pytest.approx(0.0) and float(orthogonal.sum()) == 0.0
    # the file lists the groups in another order, which candidate_directions must undo
    estimate = {
        "groups": [list(n) for n in reversed(names)],
        "delta": orthogonal.flip(0).tolist(),
        "heuristic_log_ratio": planted.flip(0).tolist(),
        "mass": [0.25] * 4,
    }
    for name in ("a", "b"):
        (tmp_path / f"direction_check_{name}.json").write_text(json.dumps({"estimates": [estimate]}))
    directions = torch.stack([response_map.random_direction(i, len(names)) for i in range(40)])
    assert torch.equal(directions[3], response_map.random_direction(3, len(names)))
    y = directions @ planted
    pairs = [
        {
            "direction": d.tolist(),
            "plus": {"nested_score": 0.5 + float(yi), "accuracy": 1.0},
            "minus": {"nested_score": 0.5, "accuracy": 1.0},
        }
        for d, yi in zip(directions, y, strict=True)
    ]
    # Δχ = −planted at equal masses: the LLC route's direction toward NESTED, −Δχ, is the planted gradient
    delta = Susceptibilities(
        matrix=-planted[None],
        stderr=torch.full((1, 4), 0.1, dtype=torch.float64),
        mu=torch.tensor([0.0], dtype=torch.float64),
        names=["llc"],
        kinds=["LLC"],
        sample_ids=torch.arange(4),
        group_names=["0", "1", "2", "3"],
        group_index=torch.arange(4),
        nbeta=30.0,
        center_loss=0.01,
        diverged_chains={"full": 0},
        config={},
    )
    result = {
        "command": "x",
        "strength": 0.5,
        "groups": names,
        "candidates": ["a+b", "missing"],
        "delta_chi": delta.save(tmp_path / "delta.json").name,
        "pairs": pairs,
    }
    table = response_map.summarize(result)
    assert (
        "| heuristic | +1.000 | 0.0005 | + |" in table and "| llc_route −Δχ | +1.000 | 0.0005 | + |" in table
    )
    row = next(line for line in table.splitlines() if line.startswith("| δ a+b |"))
    assert abs(float(row.split("|")[2])) < 0.3 and float(row.split("|")[3]) > 0.05 and "missing" not in table
    assert "Even response" not in table
    b, se = response_map.least_squares(directions, y)
    torch.testing.assert_close(b, planted)
    assert float(se.max()) < 1e-6
    # even response: each pair's mean score against its seed's baseline (seeds 0-3 here, one without one)
    for seed, pair in enumerate(pairs[:4]):
        pair.update(seed=seed, plus={"nested_score": 0.6 + 0.2 * seed, "accuracy": 1.0})
        pair["minus"] = {"nested_score": 0.4, "accuracy": 1.0}
    base = [("baseline", 0, 0.4), ("baseline", 1, 0.5), ("baseline", 2, 0.6), ("reference", 3, 0.0)]
    sweep = tmp_path / "sweep.csv"
    sweep.write_text("arm,seed,nested_score\n" + "".join(f"{a},{s},{v}\n" for a, s, v in base))
    even = {**result, "pairs": pairs[:4], **response_map.baseline_scores([sweep])}
    assert "+0.100 [+0.100, +0.100] (95 % t), 3 / 3 pairs up" in response_map.summarize(even)


def test_validity_pools_each_default_configuration_run_once(tmp_path: Path) -> None:
    """Runs repeated across files count once, other configurations are left out, the arms' baseline rows
    are the natural-weight runs, and the table's counts and Fisher tests follow from them."""
    from recipes.parentheses.stats import fisher_exact
    from research.parentheses import validity

    header = "arm,seed,nested_score,accuracy\n"
    (tmp_path / "sweep_default.csv").write_text(
        header + "baseline,0,0.95,0.98\nbaseline,1,0.75,1.0\nllc_route,0,0.97,0.95\n"
    )
    # the same baseline runs again (another sweep's copy) and a run of another schedule
    (tmp_path / "sweep_default_llc.csv").write_text(header + "baseline,0,0.95,0.98\n")
    (tmp_path / "sweep_default_steps1400.csv").write_text(header + "baseline,5,0.99,0.5\n")
    runs = [
        {"seed": 0, "nested_score": 0.97, "accuracy": 0.95},
        {"seed": 2, "nested_score": 0.85, "accuracy": 1.0},
    ]
    (tmp_path / "direction_check_a.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "direction_check_open_choice.json").write_text(json.dumps({"runs": [{**runs[1], "seed": 9}]}))
    pair = {
        "seed": 3,
        "plus": {"nested_score": 1.0, "accuracy": 0.97},
        "minus": {"nested_score": 0.6, "accuracy": 1},
    }
    (tmp_path / "response_map_b.json").write_text(json.dumps({"pairs": [pair]}))

    found = sorted(validity.default_config_runs(tmp_path), key=lambda r: (r.seed, r.nested_score))
    assert [(r.seed, r.nested_score, r.reweighted) for r in found] == [
        (0, 0.95, False),
        (0, 0.97, True),
        (1, 0.75, False),
        (2, 0.85, True),
        (3, 0.6, True),
        (3, 1.0, True),
    ]
    table = validity.pooled_table(found)
    assert "| 0.95–1.00 | 1 / 1 | 2 / 2 |" in table and "| 0.70–0.80 | 0 / 1 | 0 / 0 |" in table
    assert (
        f"3 of 3 below 99 %; score < 0.9: 0 of 3 (Fisher exact p = {fisher_exact(3, 0, 0, 3):.2g})" in table
    )
    assert validity.error_kind("()(()())))", 0) == ("FALSE", "dips", 2, "10–14")
    assert validity.error_kind("((((", 0) == ("FALSE", "never dips", 4, "2–8")
    assert validity.error_kind("()()()(())()()()()()", 1) == ("TRUE", "never dips", 0, "16–20")


def test_study_sweep_runs_a_study_arm_on_a_study_configuration(tmp_path: Path) -> None:
    """``research.parentheses.sweep``: a preset name, a study arm, results where asked."""
    pytest.importorskip("jsonargparse")
    from research.parentheses.sweep import main

    tiny = [f"--set={arg.removeprefix('--')}" for arg in TINY if "progress_bar" not in arg]
    argv = ["--config", "baseline", "--arms", "baseline", "reference_heuristic", "--seed-list", "0"]
    rows = main([*argv, "--results-dir", str(tmp_path), "--log-dir", str(tmp_path), *tiny])
    assert sorted(r["arm"] for r in rows) == ["baseline", "reference_heuristic"]
    text = (tmp_path / "sweep_baseline.md").read_text()
    assert "NESTED>0.5 arm/base" in text  # the bidirectional configuration counts NESTED above 0.5


def test_study_configurations_resolve_to_the_recipe_base_and_overlays() -> None:
    from research.parentheses.configs import config_files, config_name

    assert config_files("open_choice_d80") == ["recipes/parentheses/configs/base.yaml"]
    assert config_files("recipes/parentheses/configs/open_choice.yaml") == [
        "recipes/parentheses/configs/base.yaml",
        "recipes/parentheses/configs/variants/d64.yaml",
    ]
    assert config_name("recipes/parentheses/configs/open_choice.yaml") == "open_choice"
    with pytest.raises(ValueError, match="neither"):
        config_files("no_such_configuration")
