"""PatterningCallback driving per-token weights online: estimate per-token χ → solve → update the token
rule; the same weights on every DDP rank; crash and resume reproduce weights and model bitwise."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_patterning as lp
from lightning_patterning.observables import ProbeLoss
from tests.token_lm import ToyLMModule, markov_sequences, token_datamodule

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=2, num_draws=10, batch_size=16)
HELD_OUT = markov_sequences(32, 17, seed=50)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _callback(every: int = 5) -> lp.PatterningCallback:
    return lp.PatterningCallback(
        CONFIG,
        observables=[ProbeLoss("held_out", HELD_OUT)],
        target=lp.targets.Shift({"held_out": -1.0}),
        strength=0.5,
        every_n_train_steps=every,
        probe_size=8,
        progress=False,
    )


def _trainer(tmp_path, callbacks: list, steps: int, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def _setup() -> tuple[ToyLMModule, lp.PatterningDataModule]:
    L.seed_everything(0, verbose=False)
    return ToyLMModule(), token_datamodule(0)


def test_online_updates_move_the_token_rule_along_the_target(tmp_path) -> None:
    module, data = _setup()
    callback = _callback()
    _trainer(tmp_path, [callback], 15).fit(module, datamodule=data)
    assert [h["step"] for h in callback.history] == [5, 10, 15]
    assert data.token_rule.version == 3 and data.sampler.weights.unique().tolist() == [1.0]
    # Training saw each update from the next step on (the rule is read in training_step).
    assert module.applied[:5] == [[1.0, 1.0]] * 5
    assert module.applied[5] != [1.0, 1.0] and module.applied[5] == module.applied[9]
    assert module.applied[10] != module.applied[9]
    for row in callback.history:
        print({k: round(v, 4) for k, v in row.items() if k != "seconds"})
        assert row["active"] == 1.0 and math.isfinite(row["heldout_r"])
        # First order, the update lowers the probe loss, as the target asks (both signs come from χ).
        assert row["predicted_dmu/held_out"] < 0
    assert callback.latest is not None and callback.latest.per_token


class _DumpApplied(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        history = next(c for c in trainer.callbacks if isinstance(c, lp.PatterningCallback)).history
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"applied": pl_module.applied, "dh": [h["dh/1"] for h in history]}, handle)


def test_ddp_ranks_apply_the_same_token_weights_after_every_update(tmp_path) -> None:
    module, data = _setup()
    callbacks = [_callback(), _DumpApplied(str(tmp_path))]
    _trainer(tmp_path, callbacks, 10, strategy="ddp_spawn", devices=2).fit(module, datamodule=data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["applied"]) == 10 and len(ranks[0]["dh"]) == 2
    assert ranks[0] == ranks[1]  # each rank estimated its share of the chains; the all-reduce made χ equal
    assert ranks[0]["applied"][5] != [1.0, 1.0]


class _CrashAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:Be aware that when using `ckpt_path`")
def test_crash_and_resume_reproduce_online_token_weights_and_model(tmp_path) -> None:
    module, data = _setup()
    full = _callback()
    _trainer(tmp_path / "full", [full], 20).fit(module, datamodule=data)
    full_weights, full_params = data.token_weights, [p.detach().clone() for p in module.parameters()]

    module, data = _setup()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(
            tmp_path / "crash", [_callback(), checkpoint, _CrashAt(13)], 20, enable_checkpointing=True
        ).fit(module, datamodule=data)

    module, data = _setup()
    resumed = _callback()
    ckpt = next((tmp_path / "ckpt").glob("*step=8.ckpt"))
    _trainer(tmp_path / "resume", [resumed], 20).fit(module, datamodule=data, ckpt_path=ckpt)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history] == [5, 10, 15, 20]
    assert torch.equal(data.token_weights, full_weights)
    assert data.token_rule.version == 4
    for a, b in zip(module.parameters(), full_params, strict=True):
        assert torch.equal(a.detach(), b)
