"""Small Lightning models and data shared by the callback tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def regression_data(n: int = 256, d: int = 8, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, generator=generator) + 0.1 * torch.randn(n, generator=generator)
    return TensorDataset(x, y)


class RegressionModule(L.LightningModule):
    """An MLP with BatchNorm and Dropout (so isolation tests see buffers and train-mode randomness)."""

    def __init__(
        self,
        d: int = 8,
        hidden: int = 16,
        lr: float = 0.05,
        n: int = 256,
        batch_size: int = 16,
        dropout: float = 0.2,
        shuffle: bool = True,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(d, hidden),
            nn.BatchNorm1d(hidden) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def per_sample_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (self(x) - y) ** 2

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            regression_data(self.hparams.n, self.hparams.d),
            batch_size=self.hparams.batch_size,
            shuffle=self.hparams.shuffle,
        )
