"""A regression mixture of two sources with a known answer for patterning.

Source A (most samples) and source B have different true weights; one linear model must compromise. The
probe set is held-out data from B: shifting training weight toward B must lower the probe loss faster.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_patterning as lp
from lightning_patterning.observables import ProbeLoss

D = 4
SIZES = (600, 200)


def sources(seed: int) -> tuple[TensorDataset, TensorDataset, list[int]]:
    """Training data (x, y) of A then B, held-out B data, and the source id of each training sample."""
    generator = torch.Generator().manual_seed(1000 + seed)
    truth = torch.randn(2, D, generator=generator)
    truth[1] = -truth[0] + 0.5 * torch.randn(D, generator=generator)  # B disagrees with A
    xs, ys, labels = [], [], []
    for source, size in enumerate(SIZES):
        x = torch.randn(size, D, generator=generator)
        xs.append(x)
        ys.append(x @ truth[source] + 0.1 * torch.randn(size, generator=generator))
        labels += [source] * size
    held_x = torch.randn(256, D, generator=generator)
    held_out_b = TensorDataset(held_x, held_x @ truth[1])
    return TensorDataset(torch.cat(xs), torch.cat(ys)), held_out_b, labels


class MixtureData(L.LightningDataModule):
    def __init__(self, train: TensorDataset, batch_size: int = 32) -> None:
        super().__init__()
        self.train = train
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)


class LinearRegressor(L.LightningModule):
    def __init__(self, lr: float = 0.02) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(D, 1)

    def per_sample_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return (self.linear(x).squeeze(-1) - y) ** 2

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def probe_loss(model: LinearRegressor, data: TensorDataset) -> float:
    with torch.no_grad():
        return float(model.per_sample_loss(data.tensors).mean())


def patterning_callback(held_out_b: TensorDataset, sign: float, every: int = 10) -> lp.PatterningCallback:
    config = lp.SGLDConfig(lr=1e-3, nbeta=50.0, localization=100.0, num_chains=2, num_draws=20, batch_size=32)
    return lp.PatterningCallback(
        config,
        observables=[ProbeLoss("probe_B", held_out_b)],
        target=lp.targets.Shift({"probe_B": sign}),
        strength=0.5,
        noise_gate=None,  # full-strength updates: 2 chains give 1-dof errors, which the gate would not trust
        every_n_train_steps=every,
        probe_size=200,
        progress=False,
    )


def train(seed: int, sign: float | None, steps: int = 60, tmp_path=None) -> dict[str, float]:
    """Train from the same init and batch-order seed; ``sign`` None: plain weighted sampling (baseline)."""
    train_data, held_out_b, labels = sources(seed)
    L.seed_everything(seed, verbose=False)
    model = LinearRegressor()
    data = lp.PatterningDataModule(MixtureData(train_data), groups=labels, seed=seed)
    data.set_weights(torch.tensor(SIZES, dtype=torch.float64))  # natural mass of each source
    callbacks = [] if sign is None else [patterning_callback(held_out_b, sign)]
    trainer = L.Trainer(
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
    trainer.fit(model, datamodule=data)
    weights = data.weights / data.weights.sum()
    return {"probe_loss": probe_loss(model, held_out_b), "mass_B": float(weights[1])}
