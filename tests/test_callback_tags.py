"""Every tag a callback logs starts with its ``name``: two callbacks of one kind never collide, and the
TensorBoard custom-scalars layout holds one section per callback."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_patterning as lp
from lightning_patterning.observables import LLC, ProbeLoss
from tests.patterning_problem import LinearRegressor, MixtureData, sources

CONFIG = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=2, num_draws=5, batch_size=32)
LIGHTNING_TAGS = {"hp_metric", "epoch"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logged(log_dir: str) -> tuple[dict[str, set[str]], list[str]]:
    """Tags per kind (scalars, images, histograms) and the custom-scalars sections of a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    events = EventAccumulator(
        log_dir, size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    )
    events.Reload()
    tags = events.Tags()
    kinds = {kind: set(tags[kind]) for kind in ("scalars", "images", "histograms")}
    config = events.Tensors("custom_scalars__config__")[-1]
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(config.tensor_proto).item())
    return kinds, [category.title for category in layout.category]


def test_two_callbacks_of_each_kind_with_different_names_log_disjoint_tags(tmp_path):
    train, held_b, labels = sources(0)
    L.seed_everything(0, verbose=False)
    data = lp.PatterningDataModule(MixtureData(train), groups=labels, seed=0)
    observables = [ProbeLoss("probe_B", held_b), LLC()]
    common = dict(every_n_train_steps=5, progress=False)
    callbacks = {
        "llc_a": lp.LLCCallback(CONFIG, name="llc_a", **common),
        "llc_b": lp.LLCCallback(CONFIG, name="llc_b", restrict="linear.weight", **common),
        "chi_a": lp.SusceptibilityCallback(CONFIG, observables, probe_size=50, name="chi_a", **common),
        "chi_b": lp.SusceptibilityCallback(CONFIG, observables, probe_size=50, name="chi_b", **common),
    }
    for name in ("pat_a", "pat_b"):
        callbacks[name] = lp.PatterningCallback(
            CONFIG,
            observables,
            lp.targets.Shift({"probe_B": -1.0}),
            noise_gate=None,
            probe_size=50,
            name=name,
            **common,
        )
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        max_steps=10,
        callbacks=list(callbacks.values()),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(LinearRegressor(), datamodule=data)
    kinds, sections = _logged(logger.log_dir)
    every = set().union(*kinds.values()) - LIGHTNING_TAGS
    owned = {name: {t for t in every if t.startswith(f"{name}/")} for name in callbacks}
    assert set().union(*owned.values()) == every  # no tag outside a callback's name
    for a, b in (("llc_a", "llc_b"), ("chi_a", "chi_b"), ("pat_a", "pat_b")):
        assert owned[a] and owned[b] and not owned[a] & owned[b]
        suffixes = {t.removeprefix(f"{a}/") for t in owned[a]}
        assert suffixes == {t.removeprefix(f"{b}/") for t in owned[b]}  # the same things, apart
    assert {"llc_a/mean", "llc_a/sgld/diverged_chains"} <= kinds["scalars"]
    assert {"chi_a/mu/probe_B", "chi_a/sgld/seconds", "pat_a/mu/probe_B", "pat_a/ess_fraction"} <= every
    assert {"pat_a/mass/0", "pat_a/mass/1", "pat_a/predicted_dmu/probe_B"} <= kinds["scalars"]
    assert {"llc_a/traces", "chi_a/matrix", "pat_a/matrix"} <= kinds["images"]
    assert {"pat_a/weights", "pat_b/weights"} <= kinds["histograms"]
    assert sorted(sections) == sorted(callbacks)  # one custom-scalars section per callback, all kept
