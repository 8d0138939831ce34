"""Which re-weightings move the *final* nested score? A map of the long-run response by random directions.

The susceptibilities predict the first-order response of the posterior at a checkpoint. What patterning
needs is the response of the outcome of training: the gradient ``G_g = ∂(final nested score)/∂(log-weight
of group g)``. This measures it without any model of it, by antithetic random directions: for pair ``i``
draw ``d_i ~ N(0, I)`` over the groups (seeded by ``i``), train seed ``--seed-offset + i`` from scratch
twice, with group weights ``natural × exp(±α·d_i)``, and record ``y_i`` = nested score(+) − nested
score(−). To first order ``y_i ≈ 2α·⟨G, d_i⟩``, so:

* for a candidate direction ``h`` (centred: a constant log-weight shift changes nothing), the correlation
  across pairs of ``y_i`` with ``⟨d_i, h⟩`` estimates the cosine of ``h`` with ``G`` up to the noise
  share: positive if re-weighting along ``h`` raises the final score. Candidates: the reference
  heuristic's log-weights (known to raise the score: the assay's positive control) and the mean
  controlled direction of each ``--candidates`` direction check and the LLC route's direction toward
  NESTED (the linear response's predictions, solved to raise it). Two-sided permutation p
  (``PERMUTATIONS`` relabellings).
* the least-squares fit ``y ≈ X·b`` (``X`` = the directions) estimates ``2α·G`` per group with standard
  errors.
* with ``--baseline`` (sweep CSVs holding baseline runs of the pairs' seeds): the *even* response, the
  mean over pairs of ``(score(+) + score(−))/2 − score(baseline)``. To second order it is
  ``α²·dᵀHd/2``, what re-weighting of this size does whatever its direction; first-order patterning can
  only be seen against it.

Writes ``results/response_map_<name>.json`` and ``.md``; ``--combine A B --name C`` pools the pairs of
processes run with the same strength.

    python -m research.parentheses.response_map --pairs 0 1 2 3 --name pairs0-3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.patterning.solve import solve_log_weights
from recipes.parentheses.patterning import group_keys, log_weight_map, mean_direction
from recipes.parentheses.stats import t_interval, wilcoxon_signed_rank
from research.parentheses.configs import RESULTS
from research.parentheses.direction_check import (
    BASE,
    baseline_cli,
    baseline_scores,
    causal_run,
    weighted_cli,
    write_report,
)
from research.parentheses.llc_route import delta_chi_path

PERMUTATIONS = 20_000
CANDIDATES = (
    "step2",
    "step10_16seeds",
    "step40",
    "branch150_16seeds",
    "branch300_16seeds",
    "est700_seeds0-2+est700_seeds1-3",
)


def random_direction(pair: int, n_groups: int) -> torch.Tensor:
    """``d ~ N(0, I)`` over ``n_groups`` groups, from a generator seeded by ``pair``."""
    return torch.randn(n_groups, generator=torch.Generator().manual_seed(pair), dtype=torch.float64)


def correlation_test(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Pearson ``r`` of ``x`` and ``y`` and its two-sided permutation p-value (``PERMUTATIONS`` shuffles of
    ``y``; p = (1 + #|r_perm| ≥ |r|) / (1 + PERMUTATIONS))."""
    x, y = x - x.mean(), y - y.mean()
    r = float((x @ y) / (x.norm() * y.norm()))
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.stack([y[torch.randperm(len(y), generator=generator)] for _ in range(PERMUTATIONS)])
    r_perm = (shuffled @ x) / (x.norm() * y.norm())
    return r, float((1 + (r_perm.abs() >= abs(r) - 1e-12).sum()) / (1 + PERMUTATIONS))


def least_squares(directions: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``b = argmin ‖y − X·b‖²`` and its standard errors ``√(s²·diag((XᵀX)⁻¹))``, ``s²`` = RSS/(n − k)."""
    n, k = directions.shape
    gram_inverse = torch.linalg.inv(directions.T @ directions)
    b = gram_inverse @ directions.T @ y
    residual = y - directions @ b
    s2 = float(residual @ residual) / max(n - k, 1)
    return b, (s2 * gram_inverse.diagonal()).sqrt()


def _aligned(
    names: list[tuple[int, ...]], groups: list[tuple[int, ...]], values: list[float]
) -> torch.Tensor:
    """``values`` (one per group of ``groups``) in the order of ``names``; 0 for groups not in ``groups``."""
    by_group = log_weight_map(groups, values)
    return torch.tensor([by_group.get(n, 0.0) for n in names], dtype=torch.float64)


def candidate_directions(
    names: list[tuple[int, ...]], checks: list[str], delta_chi: str | None = None
) -> dict[str, torch.Tensor]:
    """The heuristic's log-weights, each direction check's mean controlled direction and the LLC route's
    direction toward NESTED (``solve_log_weights(Δχ, −1)`` from the Δχ file ``delta_chi``), over ``names``
    (a file in ``RESULTS``; groups a file lacks get 0). ``A+B`` pools the estimates of checks ``A`` and
    ``B``; checks without a result file are skipped."""
    out: dict[str, torch.Tensor] = {}
    mass = None
    for check in checks:
        paths = [RESULTS / f"direction_check_{part}.json" for part in check.split("+")]
        if not all(path.exists() for path in paths):
            continue
        estimates = [e for path in paths for e in json.loads(path.read_text())["estimates"]]
        groups = [tuple(g) for g in estimates[0]["groups"]]
        if "heuristic" not in out:
            out["heuristic"] = _aligned(names, groups, estimates[0]["heuristic_log_ratio"])
        out[f"δ {check}"] = _aligned(names, groups, mean_direction(estimates).tolist())  # r ignores the scale
        mass = _aligned(names, groups, estimates[0]["mass"])
    if mass is not None and delta_chi:  # the LLC route's direction toward NESTED, as its arm solves it
        chi = Susceptibilities.load(RESULTS / delta_chi)
        columns = torch.tensor([int(c) for c in chi.group_names])
        direction = solve_log_weights(
            chi.matrix.double(), torch.tensor([-1.0], dtype=torch.float64), mass[columns]
        )
        out["llc_route −Δχ"] = torch.zeros(len(names), dtype=torch.float64).index_copy_(0, columns, direction)
    return out


def summarize(result: dict[str, Any]) -> str:
    pairs = result["pairs"]
    names = [tuple(n) for n in result["groups"]]
    directions = torch.tensor([p["direction"] for p in pairs], dtype=torch.float64)
    y = torch.tensor(
        [p["plus"]["nested_score"] - p["minus"]["nested_score"] for p in pairs], dtype=torch.float64
    )
    accuracies = [p[s]["accuracy"] for p in pairs for s in ("plus", "minus")]
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"{len(pairs)} antithetic pairs, weights natural × exp(±{result['strength']}·d), d ~ N(0, I) over "
        f"{len(names)} groups; y = nested score(+) − nested score(−): mean {float(y.mean()):+.3f}, "
        f"sd {float(y.std()):.3f}; accuracy min {min(accuracies):.4f}, mean "
        f"{sum(accuracies) / len(accuracies):.4f}.",
        "",
        "## Candidate directions: correlation of y with ⟨d, h⟩ (h centred)",
        "",
        "| candidate h | r | permutation p | expected sign |",
        "|---|---:|---:|---|",
    ]
    for name, h in candidate_directions(names, result["candidates"], result.get("delta_chi")).items():
        r, p = correlation_test(directions @ (h - h.mean()), y)
        lines.append(f"| {name} | {r:+.3f} | {p:.4f} | + |")
    baseline = {int(seed): score for seed, score in result.get("baseline", {}).items()}
    paired = [p for p in pairs if baseline and p["seed"] in baseline]
    if paired:
        even = [
            (p["plus"]["nested_score"] + p["minus"]["nested_score"]) / 2 - baseline[p["seed"]] for p in paired
        ]
        mean, low, high = t_interval(even)
        lines += [
            "",
            "## Even response: mean of the pair's two scores − the seed's baseline score",
            "",
            f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (95 % t), {sum(e > 0 for e in even)} / {len(even)} pairs "
            f"up, exact Wilcoxon p = {wilcoxon_signed_rank(even)[1]:.4f}.",
        ]
    if len(pairs) > len(names):
        b, se = least_squares(directions, y)
        lines += [
            "",
            f"## Least squares y ≈ X·b (b ≈ 2·{result['strength']}·∂score/∂log-weight), per group",
            "",
            "| group (label, depth or imbalance, length bucket) | b | standard error |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {n} | {bi:+.4f} | {si:.4f} |"
            for n, bi, si in zip(names, b.tolist(), se.tolist(), strict=True)
        ]
    return "\n".join(lines) + "\n"


def _path(name: str) -> Path:
    return RESULTS / f"response_map_{name}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=BASE)
    parser.add_argument("--pairs", type=int, nargs="*", default=[0, 1, 2, 3])
    parser.add_argument("--seed-offset", type=int, default=100, help="pair i trains model seed offset + i")
    parser.add_argument("--strength", type=float, default=0.75, help="α: log-weights ±α·d")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), metavar="CHECK")
    parser.add_argument("--name", default="pairs0-3")
    parser.add_argument("--combine", nargs="+", metavar="NAME", help="instead: pool earlier maps into --name")
    parser.add_argument(
        "--baseline",
        type=Path,
        nargs="+",
        help="sweep CSVs: baseline runs of the seeds (even response)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = _path(args.name)
    command = "python -m research.parentheses.response_map " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    delta_chi = delta_chi_path(args.config).name if delta_chi_path(args.config).exists() else None
    if args.combine:
        parts = [json.loads(_path(n).read_text()) for n in args.combine]
        if len({(p["strength"], json.dumps(p["groups"])) for p in parts}) != 1:
            parser.error("--combine: the maps must share the strength and the groups")
        pooled = {**parts[0], "command": command, "candidates": args.candidates, "delta_chi": delta_chi}
        pooled.update(baseline_scores(args.baseline))
        pooled["pairs"] = [pair for p in parts for pair in p["pairs"]]
        write_report(out, pooled, summarize)
        return
    names = group_keys(baseline_cli(args.config, 0).datamodule.datamodule.train_set)[1]
    result: dict[str, Any] = {
        "command": command,
        "strength": args.strength,
        "groups": [list(n) for n in names],
        "candidates": args.candidates,
        "delta_chi": delta_chi,
        "pairs": [],
        **baseline_scores(args.baseline),
    }
    for pair in args.pairs:
        seed = args.seed_offset + pair
        d = random_direction(pair, len(names))
        log_weights = log_weight_map(names, d)
        runs = {
            sign: causal_run(weighted_cli(args.config, seed, log_weights, sign, args.strength), seed, sign)
            for sign in (1, -1)
        }
        result["pairs"].append(
            {"pair": pair, "seed": seed, "direction": d.tolist(), "plus": runs[1], "minus": runs[-1]}
        )
        print(
            f"[response_map] pair {pair}: {runs[1]['nested_score']:.3f} / {runs[-1]['nested_score']:.3f}",
            flush=True,
        )
        out.write_text(json.dumps(result))
    write_report(out, result, summarize)


if __name__ == "__main__":
    main()
