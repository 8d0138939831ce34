"""The paper's route for the ``llc_route`` arm: reference solutions → LLC susceptibilities → Δχ file.

1. Two reference solutions, trained (``--seeds``, default 0; the base config's model and schedule) on the
   training set plus ``n_extra`` OOD-type strings (disjoint from the OOD test set) labelled FALSE (NESTED)
   or TRUE (EQUAL-COUNT). Both still fit the original training set.
2. At each, ``lp.estimate_susceptibilities(observables=[LLC()])`` on the original training data, columns =
   the ``depth_length`` groups (``probe_size`` evenly spaced training strings, aggregated per group).
3. ``Δχ = χ(λ_NESTED) − χ(λ_EQUAL)`` (averaged over the seeds) saved as a one-row ``Susceptibilities``
   (row ``llc``).

``--calibrate KEY=V1,V2 …`` instead estimates the LLC at both references over a grid of sampler settings
(the check that the sampler is in a data-driven regime).

``configs/arms/llc_route.yaml`` trains from scratch with ``PatterningCallback(susceptibilities=path,
target=Shift({"llc": -1.0}))``: ``dh ∝ −Δχ`` (χ = (1/nβ)·∂⟨φ⟩/∂h), i.e. up-weight the groups that lower
the LLC at NESTED relative to EQUAL-COUNT (lower LLC → lower free energy → NESTED preferred).

    python -m research.parentheses.llc_route --config baseline
    python -m research.parentheses.llc_route --config open_choice \
        --calibrate localization=300 nbeta=30,100,300,1000,3000
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

import lightning_patterning as lp
from lightning_patterning.estimators.result import Susceptibilities
from lightning_patterning.observables import LLC
from recipes.parentheses.data import ParenthesesData, ParenthesesDataset, collate_trimmed
from recipes.parentheses.model import ParenthesesClassifier, evaluate
from recipes.parentheses.patterning import group_keys
from research.parentheses.configs import RESULTS, config_args, config_name


def reference_set(data: ParenthesesData, algorithm: str, n_extra: int) -> ParenthesesDataset:
    """The training set plus ``n_extra`` OOD-type strings (disjoint from the OOD test set), labelled
    FALSE (``algorithm="nested"``) or TRUE (``"equal"``)."""
    if algorithm not in ("nested", "equal"):
        raise ValueError(f"algorithm must be 'nested' or 'equal', got {algorithm!r}")
    extra = data._ood(n_extra, "ood_reference", exclude=data.ood_test.tokens)
    label = 0 if algorithm == "nested" else 1
    train = data.train_set
    return ParenthesesDataset(
        torch.cat([train.tokens, extra]),
        torch.cat([train.labels, torch.full((len(extra),), label, dtype=torch.long)]),
    )


def delta_chi(nested: Susceptibilities, equal: Susceptibilities) -> Susceptibilities:
    """One-row ``Susceptibilities``: ``χ(λ_NESTED) − χ(λ_EQUAL)`` (the ``llc`` rows; same columns)."""
    if nested.columns != equal.columns:
        raise ValueError("the two estimates must have the same columns (same probe and groups)")
    row_n, row_e = nested.names.index("llc"), equal.names.index("llc")
    matrix = (nested.matrix[row_n] - equal.matrix[row_e])[None]
    stderr = torch.sqrt(nested.stderr[row_n] ** 2 + equal.stderr[row_e] ** 2)[None]
    mu = (nested.mu[row_n] - equal.mu[row_e]).reshape(1)
    diverged = {f"nested/{k}": v for k, v in nested.diverged_chains.items()}
    diverged.update({f"equal/{k}": v for k, v in equal.diverged_chains.items()})
    return Susceptibilities(
        matrix=matrix,
        stderr=stderr,
        mu=mu,
        names=["llc"],
        kinds=[nested.kinds[row_n]],
        sample_ids=nested.sample_ids.clone(),
        group_names=None if nested.group_names is None else list(nested.group_names),
        group_index=None if nested.group_index is None else nested.group_index.clone(),
        nbeta=nested.nbeta,
        center_loss=nested.center_loss - equal.center_loss,
        diverged_chains=diverged,
        config=dict(nested.config),
        metadata={
            "what": "delta chi = chi(LLC at NESTED reference) - chi(LLC at EQUAL-COUNT reference)",
            "llc_nested": float(nested.mu[row_n]),
            "llc_equal": float(equal.mu[row_e]),
        },
    )




def delta_chi_path(config: str) -> Path:
    """The ``llc_route`` arms' Δχ file for the study configuration ``config``."""
    return RESULTS / f"delta_chi_{config_name(config)}.json"


SGLD = dict(lr=1e-4, nbeta=30.0, localization=300.0, num_chains=4, num_draws=100, batch_size=64)


@dataclass
class References:
    """The base config's data and the two reference solutions trained from ``seed``."""

    data: Any
    models: dict[str, ParenthesesClassifier]
    metrics: dict[str, dict[str, float]]


def train_references(
    config: str, n_extra: int = 2000, seed: int = 0, overrides: Sequence[str] = ()
) -> References:
    """Train the NESTED and EQUAL-COUNT references of ``config`` (its model and schedule, seed ``seed``) on
    the training set plus ``n_extra`` OOD-type strings labelled by each algorithm."""
    from recipes.parentheses.cli import main as cli_main

    cli = cli_main(
        [*config_args(config), "--trainer.logger=false", *overrides], run=False, save_config_callback=None
    )
    data = cli.datamodule
    hparams = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
    models, metrics = {}, {}
    for algorithm in ("nested", "equal"):
        start = time.perf_counter()
        L.seed_everything(seed, verbose=False)
        model = ParenthesesClassifier(**hparams)
        train = reference_set(data, algorithm, n_extra)
        loader = DataLoader(train, batch_size=data.batch_size, shuffle=True, collate_fn=collate_trimmed)
        trainer = L.Trainer(
            max_steps=int(cli.trainer.max_steps),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, loader)
        val = evaluate(model, data.val_set.tokens, data.val_set.labels, data.ood_test.tokens)
        train_acc = evaluate(model, data.train_set.tokens, data.train_set.labels, data.ood_test.tokens)
        models[algorithm] = model
        metrics[algorithm] = {
            "val_accuracy": val["accuracy"],
            "train_accuracy": train_acc["accuracy"],
            "nested_score": val["nested_score"],
            "train_seconds": time.perf_counter() - start,
        }
        print(f"[llc_route] seed {seed} reference {algorithm}: {metrics[algorithm]}", flush=True)
    return References(data, models, metrics)


def make_delta_chi(
    config: str,
    out: Path,
    n_extra: int = 2000,
    probe_size: int = 2048,
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    sgld: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Build the Δχ file ``out`` for the base ``config``; returns a summary (also written next to it).

    With several ``seeds``, one pair of references is trained per seed and the file holds the mean of the
    per-seed ``Δχ`` (stderr: the per-seed jackknife errors combined, ``√Σse²/k``), which averages over
    the references' own seed-to-seed variation as well as over the chains.
    ``overrides`` are extra CLI arguments (``--data.n_train=…``); ``sgld`` replaces ``SGLD`` (the sampler).
    """
    sgld = SGLD if sgld is None else sgld
    config_sgld = lp.SGLDConfig(**sgld)
    summary: dict[str, Any] = {
        "config": config,
        "n_extra": n_extra,
        "sgld": sgld,
        "seeds": list(seeds),
        "overrides": list(overrides),
    }
    deltas = []
    for seed in seeds:
        refs = train_references(config, n_extra, seed, overrides)
        ids, names = group_keys(refs.data.train_set)
        n = len(ids)
        probe_indices = [round(i * (n - 1) / (probe_size - 1)) for i in range(probe_size)]
        results = {}
        for algorithm, model in refs.models.items():
            start = time.perf_counter()
            results[algorithm] = lp.estimate_susceptibilities(
                model,
                lambda m, b: m.per_sample_loss(b),
                refs.data.train_set,
                config_sgld,
                [LLC()],
                refs.data.train_set,
                probe_indices=probe_indices,
                groups=[ids[i] for i in probe_indices],
            )
            refs.metrics[algorithm].update(
                llc=float(results[algorithm].mu[0]),
                diverged_chains=results[algorithm].diverged_chains,
                sgld_seconds=time.perf_counter() - start,
            )
        summary[f"seed{seed}"] = refs.metrics
        deltas.append(delta_chi(results["nested"], results["equal"]))
        print(f"[llc_route] seed {seed}: {refs.metrics}", flush=True)
    delta = average_delta_chi(deltas)
    out.parent.mkdir(parents=True, exist_ok=True)
    delta.save(out)
    by_group = {}
    for col, value, err in zip(
        delta.columns, delta.matrix[0].tolist(), delta.stderr[0].tolist(), strict=True
    ):
        label, feature, bucket = names[int(col)]
        by_group[f"{'TRUE d' if label else 'FALSE |imb|'}={feature} len-bucket={bucket}"] = [value, err]
    summary["delta_chi_by_group"] = by_group
    if len(deltas) > 1:
        rows = torch.stack([d.matrix[0] for d in deltas])
        summary["seed_to_seed_correlation"] = torch.corrcoef(rows).tolist()
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def average_delta_chi(deltas: Sequence[Susceptibilities]) -> Susceptibilities:
    """The mean of per-seed ``Δχ`` files (same columns); stderr ``√Σse²/k``."""
    if len(deltas) == 1:
        return deltas[0]
    if any(d.columns != deltas[0].columns for d in deltas):
        raise ValueError("every seed's Δχ must have the same columns (same probe and groups)")
    k = len(deltas)
    first = deltas[0]
    return replace(
        first,
        matrix=torch.stack([d.matrix for d in deltas]).mean(0),
        stderr=torch.stack([d.stderr**2 for d in deltas]).sum(0).sqrt() / k,
        mu=torch.stack([d.mu for d in deltas]).mean(0),
        center_loss=sum(d.center_loss for d in deltas) / k,
        diverged_chains={
            f"seed{i}/{n}": v for i, d in enumerate(deltas) for n, v in d.diverged_chains.items()
        },
        metadata={**first.metadata, "seeds": k, "llc_by_seed": [d.metadata for d in deltas]},
    )


def calibrate(
    config: str,
    grid: Sequence[dict[str, float]],
    seed: int = 0,
    sgld: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, object]:
    """LLC at both references of ``seed`` for each sampler setting in ``grid`` (overrides of ``sgld``).

    The check devinterp recommends before trusting an estimate: no chain diverges, and ``λ̂`` settles as
    the settings change. Measured on this recipe (research/parentheses/LOG.md): at saturated references
    ``λ̂`` grows with ``nβ`` (the sampler is prior-dominated); at label-smoothed references it grows with
    the chain length ``lr × steps``. The ``distance`` diagnostic ``‖w − w*‖`` is dominated by the many
    directions the loss barely constrains, so it tracks ``γ`` and the chain length, not ``nβ``.
    """
    refs = train_references(config, seed=seed, overrides=overrides)
    base = {**(SGLD if sgld is None else sgld)}
    rows: list[dict[str, Any]] = []
    for setting in grid:
        row: dict[str, Any] = {"setting": dict(setting)}
        for algorithm, model in refs.models.items():
            start = time.perf_counter()
            result = lp.estimate_llc(
                model,
                lambda m, b: m.per_sample_loss(b),
                refs.data.train_set,
                lp.SGLDConfig(**{**base, **setting}),
            )
            row[algorithm] = {
                "llc": result.mean,
                "stderr": result.stderr,
                "diverged": int(result.diverged.sum()),
                "distance": result.diagnostics["distance"],
                "seconds": time.perf_counter() - start,
            }
        rows.append(row)
        print(f"[llc_route] {row}", flush=True)
    return {
        "config": config,
        "seed": seed,
        "sgld": base,
        "overrides": list(overrides),
        "references": refs.metrics,
        "grid": rows,
    }


def _number(text: str) -> int | float:
    """A grid value: ``int`` when it is written as one (``num_draws=400``), else ``float``."""
    return int(text) if text.lstrip("-").isdigit() else float(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="baseline", help="a study configuration (configs.py)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="reference seeds (Δχ averaged)")
    parser.add_argument("--nbeta", type=float, default=SGLD["nbeta"])
    parser.add_argument("--num-draws", type=int, default=SGLD["num_draws"])
    parser.add_argument("--localization", type=float, default=SGLD["localization"])
    parser.add_argument("--lr", type=float, default=SGLD["lr"])
    parser.add_argument(
        "--calibrate",
        nargs="+",
        default=None,
        metavar="KEY=V1,V2",
        help="instead: LLC at both references over the product grid, e.g. nbeta=30,300 localization=1,10",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CLI override of the references' config, e.g. model.label_smoothing=0.1",
    )
    args = parser.parse_args()
    overrides = [f"--{kv}" for kv in args.set]
    torch.set_num_threads(1)
    stem = config_name(args.config)
    sampler = {
        **SGLD,
        "nbeta": args.nbeta,
        "num_draws": args.num_draws,
        "localization": args.localization,
        "lr": args.lr,
    }
    if args.calibrate:
        axes = [(k, [_number(v) for v in vs.split(",")]) for k, vs in (a.split("=") for a in args.calibrate)]
        grid = [
            dict(zip([k for k, _ in axes], values, strict=True)) for values in product(*[v for _, v in axes])
        ]
        out = Path(args.out or Path(__file__).parent / "results" / f"calibrate_{stem}.json")
        out.write_text(json.dumps(calibrate(args.config, grid, sgld=sampler, overrides=overrides), indent=1))
    else:
        out = Path(args.out or Path(__file__).parent / "results" / f"delta_chi_{stem}.json")
        make_delta_chi(args.config, out, seeds=args.seeds, overrides=overrides, sgld=sampler)
