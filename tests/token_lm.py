"""A toy next-token language model and data for the tokens-as-samples tests.

Sequences are drawn from a Markov chain over a small vocabulary and padded to a common length; a batch is
``(tokens [B, T + 1], lengths [B])``, and position ``t`` (predicting token ``t + 1``) is a sample when
``t + 1 < length``. The model is an embedding through a narrow bottleneck and a linear read-out, so it
must trade the fit of some transitions against others.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_patterning as lp

VOCAB = 8


class ToyLM(nn.Module):
    """``logits_t = W·E[x_t] + b`` with an embedding of width ``dim`` (a bigram model with a bottleneck)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.unembed = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.embed(tokens))


def per_token_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Cross entropy ``[B, T]`` of predicting token ``t + 1`` (padding positions included)."""
    tokens = batch[0]
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


def valid_positions(batch: list[torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` True where the predicted token ``t + 1`` lies inside the sequence's length."""
    tokens, lengths = batch[0], batch[1]
    return torch.arange(1, tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]


def masked_token_loss(model: nn.Module, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_fn`` for tokens as samples: ``(per-token losses [B, T], valid positions [B, T])``."""
    return per_token_loss(model, batch), valid_positions(batch)


def token_class(batch: list[torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` pattern class of each position: 1 when the current token is in the lower half of the
    vocabulary, else 0."""
    return (batch[0][:, :-1] < VOCAB // 2).long()


def markov_sequences(n: int, length: int, seed: int, min_length: int | None = None) -> TensorDataset:
    """``n`` sequences of up to ``length`` tokens from a fixed random Markov chain (sharp transitions),
    with lengths uniform in ``[min_length, length]`` (``None``: all full) and padding token 0."""
    chain = torch.Generator().manual_seed(1234)
    transitions = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB, generator=chain), dim=1)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(VOCAB, (n,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transitions[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    if min_length is None:
        lengths = torch.full((n,), length)
    else:
        lengths = torch.randint(min_length, length + 1, (n,), generator=generator)
    tokens[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return TensorDataset(tokens, lengths)


class FlatTokens(Dataset):
    """Each valid position of ``sequences`` as a sample of its own: item = ``(tokens [T + 1], position)``,
    in row-major order (sequence, then position)."""

    def __init__(self, sequences: TensorDataset) -> None:
        self.tokens, lengths = sequences.tensors
        mask = valid_positions([self.tokens, lengths])
        self.where = torch.nonzero(mask)
        self.sequence = self.where[:, 0]

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, t = self.where[index]
        return self.tokens[n], t


def flat_token_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` of ``FlatTokens``: the loss of each sample's own position, ``[B]``."""
    tokens, position = batch
    return per_token_loss(model, [tokens]).gather(1, position[:, None]).squeeze(1)


class ToyLMModule(L.LightningModule):
    """The toy LM in Lightning: ``per_sample_loss`` returns ``(losses [B, T], mask)`` (tokens as samples)
    and ``training_step`` is the one line of per-token patterning, ``lp.weighted_loss``."""

    def __init__(self, lr: float = 0.05, dim: int = 2) -> None:
        super().__init__()
        self.lr = lr
        self.model = ToyLM(dim=dim)
        self.applied: list[list[float]] = []  # class weights in effect at each training step

    def per_sample_loss(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_token_loss(self.model, batch)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        rule = self.trainer.datamodule.token_rule
        self.applied.append(rule.class_weights.tolist())
        return lp.weighted_loss(self.per_sample_loss(batch), batch, self)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MarkovData(L.LightningDataModule):
    """Full-length Markov sequences, shuffled batches of 16."""

    def __init__(self, n: int = 256, length: int = 17, seed: int = 0, batch_size: int = 16) -> None:
        super().__init__()
        self.train = markov_sequences(n, length, seed)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)


def token_datamodule(seed: int = 0, **kwargs: Any) -> lp.PatterningDataModule:
    """``MarkovData`` wrapped with the token rule of ``token_class`` (2 classes)."""
    return lp.PatterningDataModule(
        MarkovData(seed=seed, **kwargs), token_classes=token_class, num_token_classes=2, seed=seed
    )
