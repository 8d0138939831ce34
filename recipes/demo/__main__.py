"""Demo main job: a student MLP learns a small teacher network while ``LLCCallback`` tracks its LLC.

Run ``python -m recipes.demo`` (``make demo``); logs go to ``lightning_logs/demo``. The teacher has 3
hidden units (19 parameters), the student 16 (97): the student's LLC should come out far below half its
parameter count, since the model is singular and only about as complex as the teacher.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_patterning as lp


class Student(L.LightningModule):
    """A one-hidden-layer tanh MLP regressor with a per-sample squared-error loss."""

    def __init__(self, inputs: int = 4, width: int = 16, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(inputs, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def per_sample_loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return (self(x) - y) ** 2

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def teacher_data(n: int, inputs: int, teacher_width: int, noise: float, seed: int) -> TensorDataset:
    """Inputs ``x ~ N(0, I)``; targets from a random tanh teacher MLP plus Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(inputs, teacher_width, generator=generator)
    w2 = torch.randn(teacher_width, generator=generator)
    x = torch.randn(n, inputs, generator=generator)
    y = torch.tanh(x @ w1) @ w2 + noise * torch.randn(n, generator=generator)
    return TensorDataset(x, y)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--estimates", type=int, default=8, help="log-spaced LLC estimates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", default="lightning_logs")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    data = teacher_data(n=4096, inputs=4, teacher_width=3, noise=0.1, seed=args.seed)
    loader = DataLoader(data, batch_size=64, shuffle=True)
    # nβ ≈ n / log n for n = 4096; ε·nβ·(largest curvature) stays well below 1 (no divergence).
    config = lp.SGLDConfig(
        lr=1e-4,
        nbeta=500.0,
        localization=100.0,
        num_chains=4,
        num_draws=200,
        num_burnin_steps=100,
        batch_size=64,
    )
    callback = lp.LLCCallback(config, log_spaced_steps=args.estimates, first_step=20)
    trainer = L.Trainer(
        max_steps=args.steps,
        callbacks=[callback],
        logger=TensorBoardLogger(args.logdir, name="demo"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    student = Student()
    trainer.fit(student, loader)
    parameters = sum(p.numel() for p in student.parameters())
    print(f"\nLLC of the student ({parameters} parameters, d/2 = {parameters / 2:g}) during training:")
    print(f"{'step':>6} {'llc':>8} {'± se':>7} {'L(w*)':>9} {'diverged':>8} {'seconds':>8}")
    for row in callback.history:
        print(
            f"{row['step']:>6} {row['mean']:>8.2f} {row['stderr']:>7.2f} {row['init_loss']:>9.4f} "
            f"{int(row['diverged_chains']):>8} {row['seconds']:>8.1f}"
        )
    print(f"\nTensorBoard: tensorboard --logdir {trainer.logger.log_dir}")
    return callback.history


if __name__ == "__main__":
    main()
