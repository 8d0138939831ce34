"""LLCCallback under CPU DDP (``ddp_spawn``, 2 processes): chains split over ranks, same LLC on both."""

from __future__ import annotations

import json
import math

import lightning as L
import torch

import lightning_patterning as lp
from tests.lightning_models import RegressionModule

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=4, num_draws=15, batch_size=16)


class DumpHistory(L.Callback):
    """Writes every LLCCallback's history, as seen by this rank, to ``{folder}/rank{r}.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        histories = [cb.history for cb in trainer.callbacks if isinstance(cb, lp.LLCCallback)]
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"history": histories[0], "world": trainer.world_size}, handle)


def test_ddp_spawn_two_ranks_log_the_same_llc(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=10,
        callbacks=[lp.LLCCallback(CONFIG, every_n_train_steps=5, progress=False), DumpHistory(str(tmp_path))],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(RegressionModule())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    first, second = (r["history"] for r in ranks)
    assert [h["step"] for h in first] == [5, 10]
    for a, b in zip(first, second, strict=True):
        assert all(math.isfinite(a[k]) for k in ("mean", "std", "stderr"))
        assert a == {**b, "seconds": a["seconds"]}  # identical numbers on both ranks (timings differ)
