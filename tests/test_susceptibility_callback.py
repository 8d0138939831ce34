"""SusceptibilityCallback inside a Trainer: logging, saving, isolation, DDP agreement and bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_patterning as lp
from lightning_patterning.observables import LLC, Custom, ProbeLoss, Restricted
from tests.lightning_models import RegressionModule, regression_data

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=4, num_draws=20, batch_size=16)


def observables() -> list:
    return [
        ProbeLoss("heldout", regression_data(64, seed=1)),
        LLC(),
        Restricted("last", ["net.4.*"]),
        Custom("norm", "tests.test_susceptibility_callback.last_layer_norm"),
    ]


def last_layer_norm(module: torch.nn.Module) -> torch.Tensor:
    return module.net[4].weight.norm()


def _fit(tmp_path, callbacks, max_steps=10, model_options=None, **kwargs):
    L.seed_everything(0, verbose=False)
    model = RegressionModule(**(model_options or {}))
    options = dict(
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
    )
    options.update(kwargs)
    trainer = L.Trainer(**options)
    trainer.fit(model)
    return model, trainer


def test_logs_saves_and_keeps_latest_without_touching_training(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, _ = _fit(tmp_path / "plain", [])
    callback = lp.SusceptibilityCallback(
        CONFIG, observables(), every_n_train_steps=5, probe_size=32, progress=False
    )
    logger = TensorBoardLogger(tmp_path, name="tb")
    model, _ = _fit(tmp_path / "cb", [callback], logger=logger)
    for (name, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    latest = callback.latest
    assert latest is not None and latest.matrix.shape == (4, 32) and latest.metadata["step"] == 10
    assert torch.isfinite(latest.matrix).all() and torch.isfinite(latest.stderr).all()
    saved = sorted((tmp_path / "tb" / "version_0" / "susceptibility").glob("*.pt"))
    assert [p.name for p in saved] == ["step00000005.pt", "step00000010.pt"]
    assert torch.equal(lp.Susceptibilities.load(saved[-1]).matrix, latest.matrix)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert {
        "susceptibility/mu/heldout",
        "susceptibility/mu/last",
        "susceptibility/explained_variance/pc1",
    } <= set(events.Tags()["scalars"])
    assert {"susceptibility/matrix", "susceptibility/pc1_pc2_data"} <= set(events.Tags()["images"])


def test_restricted_pattern_matching_nothing_fails_at_setup(tmp_path):
    callback = lp.SusceptibilityCallback(
        CONFIG, [Restricted("attn", ["blocks.*.attn.*"])], every_n_train_steps=5
    )
    with pytest.raises(MisconfigurationException, match=r"pattern 'blocks\.\*\.attn\.\*' matches no"):
        _fit(tmp_path, [callback])


def test_duplicate_observable_names_fail_at_construction():
    with pytest.raises(ValueError, match="'llc' is used twice"):
        lp.SusceptibilityCallback(CONFIG, [LLC(), LLC()], every_n_train_steps=5)


class DumpMatrix(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        callback = next(c for c in trainer.callbacks if isinstance(c, lp.SusceptibilityCallback))
        result = callback.latest
        payload = {
            "matrix": result.matrix.tolist(),
            "stderr": result.stderr.tolist(),
            "mu": result.mu.tolist(),
        }
        with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(payload, handle)


def test_ddp_ranks_hold_the_same_matrix_matching_single_process(tmp_path):
    config = lp.SGLDConfig(lr=1e-3, nbeta=30.0, localization=100.0, num_chains=8, num_draws=60, batch_size=16)
    obs = [ProbeLoss("heldout", regression_data(64, seed=1)), Restricted("last", ["net.4.*"])]

    def run(devices: int, folder) -> list[dict]:
        folder.mkdir()
        callback = lp.SusceptibilityCallback(
            config, obs, every_n_train_steps=8, probe_size=16, progress=False
        )
        strategy = "ddp_spawn" if devices > 1 else "auto"
        # lr = 0 and no BatchNorm: the weights at the estimate are the initial ones in both runs, although
        # DDP shards the training data.
        frozen = {"lr": 0.0, "batchnorm": False}
        _fit(folder, [callback, DumpMatrix(str(folder))], 8, frozen, strategy=strategy, devices=devices)
        return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(devices)]

    single = run(1, tmp_path / "single")[0]
    ranks = run(2, tmp_path / "ddp")
    assert ranks[0] == ranks[1]
    ddp = {k: torch.tensor(v) for k, v in ranks[0].items()}
    one = {k: torch.tensor(v) for k, v in single.items()}
    # chain c's randomness depends only on (seed, run, c): the same chains, to float rounding
    assert torch.allclose(ddp["matrix"], one["matrix"], rtol=0, atol=1e-3 * float(one["stderr"].min()))
    assert torch.allclose(ddp["stderr"], one["stderr"], rtol=1e-3)
    assert torch.allclose(ddp["mu"], one["mu"], rtol=1e-5)


class _CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1


def test_groups_are_one_label_per_sample_of_the_probe_dataset_checked_when_training_starts(tmp_path):
    """Like ``PatterningDataModule(groups=...)``: one label per sample of the dataset, whichever probe
    samples the callback picks; a list of the wrong length fails before the first training step."""
    probe = regression_data(64, seed=2)
    labels = [i % 4 for i in range(64)]  # for all 64 samples; the callback probes 16 of them
    callback = lp.SusceptibilityCallback(
        CONFIG, [LLC()], probe=probe, probe_size=16, groups=labels, every_n_train_steps=5, progress=False
    )
    _fit(tmp_path / "ok", [callback], max_steps=5)
    picked = torch.linspace(0, 63, 16).round().long().tolist()
    assert callback.latest.group_names == [str(g) for g in dict.fromkeys(labels[i] for i in picked)]
    assert torch.equal(callback.latest.group_index, torch.tensor([labels[i] % 4 for i in picked]))

    wrong = lp.SusceptibilityCallback(
        CONFIG, [LLC()], probe=probe, probe_size=16, groups=labels[:10], every_n_train_steps=5
    )
    counter = _CountSteps()
    with pytest.raises(MisconfigurationException, match=r"got 10 labels; give one per sample of the probe"):
        _fit(tmp_path / "wrong", [counter, wrong], max_steps=5)
    assert counter.steps == 0
