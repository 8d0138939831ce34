"""PatterningDataModule and weighted_dataloader: delegation, Lightning integration, checkpoints, DDP."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from lightning_patterning.data import PatterningDataModule, WeightedDistributedSampler, weighted_dataloader


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mean_one(weights: torch.Tensor) -> torch.Tensor:
    """Weights in the unit ``PatterningDataModule.weights`` reports: mean 1 over the entries."""
    return weights.double() / weights.double().mean()


class IndexDataset(Dataset):
    """Sample ``i`` is ``i``; ``source`` is a per-sample group id (``i % 3``)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.source = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


class DictDataset(IndexDataset):
    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"x": torch.tensor(index), "kind": index % 2}


class NoLength(Dataset):
    def __getitem__(self, index: int) -> int:
        return index


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[int]:
        return iter(range(4))


class IndexData(L.LightningDataModule):
    """Shuffled training loader over ``IndexDataset(n)`` plus a small validation loader."""

    def __init__(self, n: int = 24, batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.n, self.batch_size, self.num_workers = n, batch_size, num_workers
        self.calls: list[str] = []

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        self.calls.append(f"setup:{stage}")
        self.train_set = IndexDataset(self.n)

    def train_dataloader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.train_set, self.batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexDataset(4), batch_size=4)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": len(self.calls)}


class Recorder(L.LightningModule):
    """Records the sample indices of every training batch as ``(epoch, indices)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, batch.tolist()))
        return self.layer(batch.float().unsqueeze(1)).square().mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def weights_for(step: int, n: int) -> torch.Tensor:
    return (torch.arange(n) % (step + 2) + 0.5).double()


class SetWeights(L.Callback):
    """At the given global steps: set new weights; write what this rank saw to ``folder`` at the end."""

    def __init__(self, steps: tuple[int, ...], folder: str | None = None) -> None:
        self.steps, self.folder = steps, folder
        self.held: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step in self.steps:
            datamodule = trainer.datamodule
            datamodule.set_weights(weights_for(trainer.global_step, len(datamodule.sampler.weights)))
            self.held.append(datamodule.weights.tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.folder is not None:
            seen = pl_module.seen  # type: ignore[attr-defined]
            with open(f"{self.folder}/rank{trainer.global_rank}.json", "w") as handle:
                json.dump({"seen": seen, "held": self.held, "world": trainer.world_size}, handle)


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


def test_delegates_hooks_attributes_and_keeps_loader_settings():
    inner = IndexData(n=10, batch_size=3)
    dm = PatterningDataModule(inner, chunk_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert inner.calls == ["prepare_data", "setup:fit"]
    assert dm.batch_size == 3 and dm.train_set is inner.train_set  # attribute access
    assert dm.val_dataloader().dataset.n == 4
    assert dict(dm.hparams) == {"n": 10, "batch_size": 3, "num_workers": 0}
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedDistributedSampler) and loader.sampler is dm.sampler
    assert (loader.batch_size, loader.dataset, loader.drop_last) == (3, inner.train_set, False)
    assert (dm.sampler.num_replicas, dm.sampler.rank) == (1, 0)
    assert sum(len(batch) for batch in loader) == 10 == len(loader.sampler)


def test_undefined_loaders_stay_undefined_for_lightning():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    class TrainOnly(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(IndexDataset(8), batch_size=2)

    dm = PatterningDataModule(TrainOnly())
    assert not is_overridden("val_dataloader", dm) and not is_overridden("transfer_batch_to_device", dm)
    assert is_overridden("val_dataloader", PatterningDataModule(IndexData()))


@pytest.mark.parametrize(
    "groups,dataset,expected",
    [
        ("source", IndexDataset(7), [i % 3 for i in range(7)]),
        ("kind", DictDataset(5), [0, 1, 0, 1, 0]),
        ([0, 0, 1, 1, 2], IndexDataset(5), [0, 0, 1, 1, 2]),
        ("source", Subset(IndexDataset(9), [8, 4, 0]), [2, 1, 0]),
    ],
)
def test_groups_from_a_field_an_attribute_or_ids(groups, dataset, expected):
    loader = weighted_dataloader(DataLoader(dataset, batch_size=2), groups=groups)
    assert loader.sampler.groups.tolist() == expected
    assert len(loader.sampler.weights) == max(expected) + 1


def test_set_weights_before_the_sampler_exists_is_applied_when_built():
    dm = PatterningDataModule(IndexData(n=6))
    dm.setup("fit")
    dm.set_weights([0, 0, 1, 0, 0, 0])
    assert dm.sampler is None and dm.weights.tolist() == [0, 0, 6, 0, 0, 0]  # reported with mean 1
    loader = dm.train_dataloader()
    assert {i for batch in loader for i in batch.tolist()} == {2}
    with pytest.raises(ValueError, match="weights"):
        dm.set_weights([1.0, float("nan"), 1, 1, 1, 1])
    assert dm.weights.tolist() == [0, 0, 6, 0, 0, 0]
    wrong = PatterningDataModule(IndexData(n=6))
    wrong.setup("fit")
    wrong.set_weights([1.0, 2.0])
    with pytest.raises(ValueError, match="weights"):
        wrong.train_dataloader()


def test_state_is_stashed_until_the_sampler_exists():
    source = PatterningDataModule(IndexData(n=12), chunk_size=2)
    source.setup("fit")
    iterator = iter(source.train_dataloader())
    next(iterator), next(iterator)
    source.set_weights(torch.arange(12.0) + 1)
    state = source.state_dict()
    expected = [i for batch in iterator for i in batch.tolist()]

    target = PatterningDataModule(IndexData(n=12), chunk_size=2)
    target.load_state_dict(state)
    assert target.state_dict()["sampler"] is state["sampler"]
    target.setup("fit")
    assert [i for batch in target.train_dataloader() for i in batch.tolist()] == expected
    assert torch.equal(target.weights, mean_one(torch.arange(12.0) + 1))


def test_restored_pending_weights_are_validated_into_a_float64_cpu_copy():
    """Pending weights from a checkpoint (e.g. loaded with ``map_location="cuda"``, or as float32) are held
    like ``set_weights`` holds them; invalid ones are refused by name."""
    saved = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    dm = PatterningDataModule(IndexData(n=3))
    dm.load_state_dict({"datamodule": {}, "weights": saved})
    saved[0] = 100.0  # the module holds a copy
    assert dm.weights.dtype == torch.float64 and dm.weights.tolist() == [0.5, 1.0, 1.5]  # mean-1 units
    assert dm.state_dict()["weights"].device.type == "cpu"
    with pytest.raises(ValueError, match="weights"):
        dm.load_state_dict({"datamodule": {}, "weights": torch.tensor([1.0, -1.0, 1.0])})


def test_clear_errors_for_unsupported_training_loaders():
    class Returns(L.LightningDataModule):
        def __init__(self, loader: Any) -> None:
            super().__init__()
            self.loader = loader

        def train_dataloader(self) -> Any:
            return self.loader

    with pytest.raises(TypeError, match="DataLoader"):
        PatterningDataModule(Returns([1, 2, 3])).train_dataloader()
    with pytest.raises(TypeError, match="IterableDataset"):
        PatterningDataModule(Returns(DataLoader(Stream(), batch_size=2))).train_dataloader()
    with pytest.raises(TypeError, match="__len__"):
        PatterningDataModule(Returns(DataLoader(NoLength(), batch_size=2))).train_dataloader()
    with pytest.raises(TypeError, match="__len__"):
        weighted_dataloader(DataLoader(NoLength(), batch_size=2))
    with pytest.raises(TypeError, match="LightningDataModule"):
        PatterningDataModule(DataLoader(IndexDataset(3)))  # type: ignore[arg-type]


def test_lightning_keeps_our_sampler_and_applies_weight_changes_within_the_lag(tmp_path):
    dm = PatterningDataModule(IndexData(n=64, batch_size=4), chunk_size=8)
    model = Recorder()
    run = trainer(tmp_path, max_steps=12, callbacks=[SetWeights(steps=(5,))])
    run.fit(model, datamodule=dm)
    assert run.train_dataloader.sampler is dm.sampler
    lag = math.ceil((8 - 1) / 4)
    allowed = set(torch.nonzero(weights_for(5, 64)).flatten().tolist())
    assert all(set(batch) <= allowed for _, batch in model.seen[5 + lag :])
    assert torch.equal(dm.weights, mean_one(weights_for(5, 64)))


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_reloaded_dataloaders_keep_the_sampler_and_plain_loaders_work_with_fit(tmp_path):
    dm = PatterningDataModule(IndexData(n=16, batch_size=4), chunk_size=4)
    run = trainer(tmp_path, max_epochs=3, reload_dataloaders_every_n_epochs=1, callbacks=[SetWeights((2,))])
    run.fit(Recorder(), datamodule=dm)
    assert run.train_dataloader.sampler is dm.sampler and dm.sampler.epoch == 2
    assert torch.equal(dm.weights, mean_one(weights_for(2, 16)))

    loader = weighted_dataloader(DataLoader(IndexDataset(16), batch_size=4), weights=[0.0] * 15 + [1.0])
    model = Recorder()
    trainer(tmp_path, max_epochs=2).fit(model, train_dataloaders=loader)
    assert {i for _, batch in model.seen for i in batch} == {15} and len(model.seen) == 8


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_an_epoch_checkpoint_reproduces_the_index_sequence(tmp_path, num_workers):
    def fit(ckpt_path: str | None, folder: Path) -> list[tuple[int, list[int]]]:
        dm = PatterningDataModule(
            IndexData(n=24, batch_size=4, num_workers=num_workers), chunk_size=4, seed=7
        )
        model = Recorder()
        checkpoint = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)
        run = trainer(
            tmp_path,
            max_epochs=3,
            callbacks=[SetWeights(steps=(3, 10)), checkpoint],
            enable_checkpointing=True,
        )
        run.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    full = fit(None, tmp_path / "a")
    assert len(full) == 18 and [e for e, _ in full] == [0] * 6 + [1] * 6 + [2] * 6
    resumed = fit(str(tmp_path / "a" / "epoch=0-step=6.ckpt"), tmp_path / "b")
    assert resumed == full[6:]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_from_a_mid_epoch_checkpoint_reproduces_the_index_sequence(tmp_path):
    def fit(ckpt_path: str | None, folder: Path) -> list[tuple[int, list[int]]]:
        dm = PatterningDataModule(IndexData(n=40, batch_size=4, num_workers=2), chunk_size=4, seed=1)
        model = Recorder()
        checkpoint = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=13)
        run = trainer(
            tmp_path,
            max_epochs=2,
            callbacks=[SetWeights(steps=(4, 15)), checkpoint],
            enable_checkpointing=True,
        )
        run.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    full = fit(None, tmp_path / "a")
    with pytest.warns(match="resuming from a checkpoint that ended before the epoch ended"):
        resumed = fit(str(tmp_path / "a" / "epoch=1-step=13.ckpt"), tmp_path / "b")
    assert resumed == full[13:]


def test_two_rank_ddp_same_weights_and_disjoint_shards(tmp_path):
    dm = PatterningDataModule(IndexData(n=32, batch_size=4), replacement=False, chunk_size=4, seed=2)
    run = trainer(
        tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[SetWeights((2, 5), str(tmp_path))]
    )
    run.fit(Recorder(), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["held"] == ranks[1]["held"] == [mean_one(weights_for(s, 32)).tolist() for s in (2, 5)]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 8
    for (epoch0, batch0), (epoch1, batch1) in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True):
        assert epoch0 == epoch1 and not set(batch0) & set(batch1)
    for epoch in range(2):
        union = [i for r in ranks for e, batch in r["seen"] if e == epoch for i in batch]
        assert sorted(union) == list(range(32))
    # each rank's sequence is what a single-process sampler for that rank draws with the same updates
    for rank in range(2):
        sampler = WeightedDistributedSampler(
            IndexDataset(32), num_replicas=2, rank=rank, seed=2, replacement=False, chunk_size=4
        )
        expected, step = [], 0
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for batch in DataLoader(IndexDataset(32), batch_size=4, sampler=sampler):
                expected.append([epoch, batch.tolist()])
                step += 1
                if step in (2, 5):
                    sampler.set_weights(weights_for(step, 32))
        assert ranks[rank]["seen"] == expected


def _source_counts(dm: PatterningDataModule, labels: torch.Tensor, epochs: int) -> torch.Tensor:
    """How often each source was drawn by the wrapped training loader over ``epochs`` epochs."""
    loader = dm.train_dataloader()
    drawn = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        drawn += [labels[batch[2]] for batch in loader]
    return torch.bincount(torch.cat(drawn), minlength=2).double()


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_1DOF_1E4 = 15.14  # chi-square quantile, 1 degree of freedom, 1 − 1e-4


@pytest.mark.parametrize("initial_mass", ["natural", "equal"])
def test_wrapped_two_source_data_is_drawn_in_its_natural_proportions_before_any_update(initial_mass):
    """A 600/200 two-source set wrapped with ``groups=`` is drawn 75/25 (chi-square) before any weight is
    set, unless equal mass is asked for explicitly; ``weights`` reports mean-1 group weights."""
    sizes = (600, 200)
    labels = torch.tensor([0] * sizes[0] + [1] * sizes[1])
    data = torch.utils.data.TensorDataset(torch.randn(800, 2), torch.zeros(800), torch.arange(800))

    class TwoSources(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(data, batch_size=50, shuffle=True)

    dm = PatterningDataModule(TwoSources(), groups=labels.tolist(), seed=3, initial_mass=initial_mass)
    counts = _source_counts(dm, labels, epochs=10)
    natural = torch.tensor([0.75, 0.25], dtype=torch.float64)
    equal = torch.tensor([0.5, 0.5], dtype=torch.float64)
    chosen, other = (natural, equal) if initial_mass == "natural" else (equal, natural)
    assert _chi_square(counts, chosen) < CHI2_1DOF_1E4, counts.tolist()
    assert _chi_square(counts, other) > 10 * CHI2_1DOF_1E4, counts.tolist()
    assert torch.allclose(dm.weights, 2 * chosen)
    dm.set_weights([600.0, 200.0])  # any positive scale; reported in the same unit
    assert torch.allclose(dm.weights, torch.tensor([1.5, 0.5], dtype=torch.float64))


def test_groups_of_the_wrong_length_fail_when_the_training_loader_is_built():
    dm = PatterningDataModule(IndexData(n=12), groups=[0, 1, 0])
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"PatterningDataModule\(groups=...\).*12 integer group ids"):
        dm.train_dataloader()
