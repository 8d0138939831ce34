"""The paper's route for the ``llc_route`` arm: reference solutions → LLC susceptibilities → Δχ file.

1. Two reference solutions, trained (seed 0, the base config's model and schedule) on the training set
   plus ``n_extra`` OOD-type strings (disjoint from the OOD test set) labelled FALSE (NESTED) or TRUE
   (EQUAL-COUNT). Both still fit the original training set.
2. At each, ``lp.estimate_susceptibilities(observables=[LLC()])`` on the original training data, columns =
   the ``depth_length`` groups (``probe_size`` evenly spaced training strings, aggregated per group).
3. ``Δχ = χ(λ_NESTED) − χ(λ_EQUAL)`` saved as a one-row ``Susceptibilities`` (row ``llc``).

``configs/arms/llc_route.yaml`` trains from scratch with ``PatterningCallback(susceptibilities=path,
target=Shift({"llc": -1.0}))``: ``dh ∝ −Δχ`` (χ = (1/nβ)·∂⟨φ⟩/∂h), i.e. up-weight the groups that lower
the LLC at NESTED relative to EQUAL-COUNT (lower LLC → lower free energy → NESTED preferred).

    python -m recipes.parentheses.llc_route --config recipes/parentheses/configs/baseline.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

import lightning_patterning as lp
from lightning_patterning.observables import LLC
from recipes.parentheses.data import collate_trimmed
from recipes.parentheses.model import ParenthesesClassifier, evaluate
from recipes.parentheses.patterning import delta_chi, group_keys, reference_set

SGLD = dict(lr=1e-4, nbeta=30.0, localization=300.0, num_chains=4, num_draws=100, batch_size=64)


def make_delta_chi(
    config: str,
    out: Path,
    n_extra: int = 2000,
    probe_size: int = 2048,
    seed: int = 0,
    overrides: Sequence[str] = (),
    sgld: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Build the Δχ file ``out`` for the base ``config``; returns a summary (also written next to it).

    ``overrides`` are extra CLI arguments (``--data.n_train=…``); ``sgld`` replaces ``SGLD`` (the sampler).
    """
    from recipes.parentheses.cli import main as cli_main

    cli = cli_main(
        ["--config", config, "--trainer.logger=false", *overrides], run=False, save_config_callback=None
    )
    data = cli.datamodule
    hparams = {k: v for k, v in cli.model.hparams.items() if not k.startswith("_")}
    steps = int(cli.trainer.max_steps)
    ids, names = group_keys(data.train_set)
    n = len(ids)
    probe_indices = [round(i * (n - 1) / (probe_size - 1)) for i in range(probe_size)]
    sgld = SGLD if sgld is None else sgld
    config_sgld = lp.SGLDConfig(**sgld)
    results, summary = {}, {"config": config, "n_extra": n_extra, "sgld": sgld, "seed": seed}
    for algorithm in ("nested", "equal"):
        start = time.perf_counter()
        L.seed_everything(seed, verbose=False)
        model = ParenthesesClassifier(**hparams)
        train = reference_set(data, algorithm, n_extra)
        loader = DataLoader(train, batch_size=data.batch_size, shuffle=True, collate_fn=collate_trimmed)
        trainer = L.Trainer(
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, loader)
        metrics = evaluate(model, data.val_set.tokens, data.val_set.labels, data.ood_test.tokens)
        train_acc = evaluate(model, data.train_set.tokens, data.train_set.labels, data.ood_test.tokens)
        chi = lp.estimate_susceptibilities(
            model,
            lambda m, b: m.per_sample_loss(b),
            data.train_set,
            config_sgld,
            [LLC()],
            data.train_set,
            probe_indices=probe_indices,
            groups=[ids[i] for i in probe_indices],
        )
        results[algorithm] = chi
        summary[algorithm] = {
            "val_accuracy": metrics["accuracy"],
            "train_accuracy": train_acc["accuracy"],
            "nested_score": metrics["nested_score"],
            "llc": float(chi.mu[0]),
            "diverged_chains": chi.diverged_chains,
            "seconds": time.perf_counter() - start,
        }
        print(f"[llc_route] reference {algorithm}: {summary[algorithm]}", flush=True)
    delta = delta_chi(results["nested"], results["equal"])
    out.parent.mkdir(parents=True, exist_ok=True)
    delta.save(out)
    by_group = {}
    for col, value, err in zip(
        delta.columns, delta.matrix[0].tolist(), delta.stderr[0].tolist(), strict=True
    ):
        label, feature, bucket = names[int(col)]
        by_group[f"{'TRUE d' if label else 'FALSE |imb|'}={feature} len-bucket={bucket}"] = [value, err]
    summary["delta_chi_by_group"] = by_group
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "baseline.yaml"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    stem = Path(args.config).stem
    make_delta_chi(
        args.config, Path(args.out or Path(__file__).parent / "results" / f"delta_chi_{stem}.json")
    )
