"""A linear regressor trained on a mixture of two data sources, and the DataModule that serves it.

Source 0 (600 samples) and source 1 (200 samples) have different true weights; ``ProbeSource(1)`` holds
fresh samples of source 1 only, so ``ProbeLoss`` on it measures how well the model fits source 1.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

DIMENSION = 4
WEIGHTS = (torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([-1.0, 0.5, 0.0, 1.0]))


class SourceData(Dataset):
    """``sizes[s]`` samples of each source ``s``: items ``{"x", "y", "source"}``."""

    def __init__(self, sizes: tuple[int, ...] = (600, 200), seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.source = torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in enumerate(sizes)])
        self.x = torch.randn(len(self.source), DIMENSION, generator=generator)
        true = torch.stack([WEIGHTS[s] for s in self.source.tolist()])
        self.y = (self.x * true).sum(dim=1) + 0.1 * torch.randn(len(self.source), generator=generator)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "y": self.y[index], "source": self.source[index]}


class ProbeSource(SourceData):
    """Fresh samples of one source (a probe set for ``ProbeLoss``)."""

    def __init__(self, source: int = 1, size: int = 128, seed: int = 1) -> None:
        sizes = tuple(size if s == source else 0 for s in range(len(WEIGHTS)))
        super().__init__(sizes, seed)


class MixtureDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train_set = SourceData(seed=seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(DIMENSION, 1)

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.linear(batch["x"]).squeeze(-1) - batch["y"]).square()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
