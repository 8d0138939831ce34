"""LLCCallback under CPU DDP (``ddp_spawn``, 2 processes): chains split over ranks, same LLC on both, and
the same chains as in one process."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import lightning as L
import torch

import lightning_patterning as lp
from tests.lightning_models import RegressionModule, regression_data

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=4, num_draws=15, batch_size=16)


class CountingDataset(torch.utils.data.Dataset):
    """The regression data, counting the samples this process fetches (SGLD minibatches)."""

    def __init__(self, n: int = 256) -> None:
        self.data = regression_data(n)
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        self.fetched += 1
        return self.data[index]


class DumpChains(L.Callback):
    """Writes, per LLCCallback: the last estimate's per-chain traces, diverged flags and the number of
    samples this rank fetched for SGLD, to ``{folder}/rank{r}.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = {
            cb.name: {
                "trace": cb.latest.trace.tolist(),
                "diverged": cb.latest.diverged.tolist(),
                "fetched": cb.dataloader.dataset.fetched,
                "mode": cb.latest.mode,
                "history": [{k: v for k, v in h.items() if k != "seconds"} for h in cb.history],
                "world": trainer.world_size,
            }
            for cb in trainer.callbacks
            if isinstance(cb, lp.LLCCallback)
        }
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(out, handle)


def _chains_run(folder, devices: int) -> list[dict]:
    folder.mkdir()
    callbacks = [
        lp.LLCCallback(
            replace(CONFIG, num_draws=8, chain_mode=mode),
            every_n_train_steps=4,
            dataloader=torch.utils.data.DataLoader(CountingDataset(), batch_size=16),
            name=mode,
            progress=False,
        )
        for mode in ("vmap", "sequential")
    ]
    trainer = L.Trainer(
        strategy="ddp_spawn" if devices > 1 else "auto",
        accelerator="cpu",
        devices=devices,
        max_steps=8,
        callbacks=[*callbacks, DumpChains(str(folder))],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=folder,
    )
    # lr = 0 and no BatchNorm: the weights at the estimate are the initial ones in both runs, although
    # DDP shards the training data.
    torch.manual_seed(0)
    trainer.fit(RegressionModule(lr=0.0, batchnorm=False))
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)]


def test_two_processes_run_each_chain_once_and_match_one_process_chain_for_chain(tmp_path):
    """Chain c's minibatches and noise depend only on (seed, run, c), in vmap and in sequential mode: the
    per-chain traces of 2-process DDP equal those of 1 process, and both ranks log the same estimates.
    Each rank fetches exactly the minibatches of its own two chains (a rank running all four, or a chain
    run nowhere, would fail both checks)."""
    single = _chains_run(tmp_path / "single", 1)[0]
    ranks = _chains_run(tmp_path / "ddp", 2)
    batch, steps = 16, 8
    check = 3 * batch  # the loss check at the start of training and at each of the two estimates
    assert all(rank[mode]["world"] == 2 for rank in ranks for mode in ("vmap", "sequential"))
    for mode in ("vmap", "sequential"):
        one = torch.tensor(single[mode]["trace"])
        assert single[mode]["mode"] == mode and not any(single[mode]["diverged"])
        assert single[mode]["fetched"] == check + 2 * 4 * batch * steps
        assert [h["step"] for h in single[mode]["history"]] == [4, 8]
        assert ranks[0][mode]["history"] == ranks[1][mode]["history"]  # the same estimates on both ranks
        assert all(math.isfinite(h[k]) for h in ranks[0][mode]["history"] for k in ("mean", "std", "stderr"))
        for rank in ranks:
            assert rank[mode]["mode"] == mode
            assert rank[mode]["fetched"] == check + 2 * 2 * batch * steps
            assert torch.allclose(torch.tensor(rank[mode]["trace"]), one, rtol=1e-5, atol=1e-7)
        assert ranks[0][mode]["trace"] == ranks[1][mode]["trace"]
    vmap, sequential = (torch.tensor(single[m]["trace"]) for m in ("vmap", "sequential"))
    assert torch.allclose(vmap, sequential, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(vmap[0], vmap[1])  # the chains differ from each other
