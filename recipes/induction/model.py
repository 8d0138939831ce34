"""A small attention-only transformer language model for the induction-circuit recipe
(Wang & Murfet 2026, arXiv 2601.13548).

As in Olsson et al. ("In-context Learning and Induction Heads", 2022) and the susceptibility papers, the
model has no MLPs: token + learned positional embedding, ``n_layers`` residual blocks
``x = x + attn(LayerNorm(x))`` and a final LayerNorm before the unembedding. Attention uses separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear layers, so ``lp.attention.head_restrictions`` finds
the heads (``l0h0 … l1h7``), and plain matmuls with a causal mask, so the forward works under
``torch.func.vmap`` (stacked SGLD chains).

Defaults (bytes, ``d_model`` 64, 2 layers of 8 heads, context 32) give 68,736 parameters:
embeddings 16,384 + 2,048, per layer 4·(64·64 + 64) + 128 (LayerNorm) = 16,768, final LayerNorm 128,
unembedding 64·256 + 256 = 16,640.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

Batch = torch.Tensor | Sequence[torch.Tensor]
"""A LongTensor of tokens ``[B, T]`` or a list/tuple whose first element is one."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections.

    ``out = o_proj(concat_h softmax(q_h k_hᵀ / √d_h + causal) v_h)`` with ``q_h`` rows
    ``h·d_h:(h+1)·d_h`` of ``q_proj``'s output (the standard ``view(B, T, H, d_h)`` split).

    Args:
        d_model: residual stream width.
        n_heads: number of heads; must divide ``d_model``.
        context: longest sequence (size of the causal mask buffer).
    """

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)
        causal = torch.ones(context, context, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over ``x`` ``[B, T, d_model]``.

        Returns:
            The output ``[B, T, d_model]`` and the attention pattern ``[B, H, T, T]`` (query, key).
        """
        batch, length, width = x.shape
        shape = (batch, length, self.n_heads, self.d_head)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, d_h]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # [B, H, T, T]
        scores = scores.masked_fill(~self.causal[:length, :length], float("-inf"))
        pattern = scores.softmax(dim=-1)
        z = (pattern @ v).transpose(1, 2).reshape(batch, length, width)  # heads concatenated
        return self.o_proj(z), pattern


class AttentionOnlyBlock(nn.Module):
    """``x + attn(LayerNorm(x))``: a transformer block without MLP."""

    def __init__(self, d_model: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, context)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, pattern = self.attn(self.ln(x))
        return x + out, pattern


class AttentionOnlyTransformer(nn.Module):
    """Attention-only transformer language model: tokens ``[B, T]`` → next-token logits ``[B, T, V]``.

    Args:
        vocab_size: number of token ids (256 for bytes).
        d_model: residual stream width.
        n_layers: number of attention-only blocks.
        n_heads: heads per block.
        context: longest input sequence.
    """

    def __init__(
        self, vocab_size: int = 256, d_model: int = 64, n_layers: int = 2, n_heads: int = 8, context: int = 32
    ) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(AttentionOnlyBlock(d_model, n_heads, context) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab_size]`` for tokens ``[B, T]`` (position t sees tokens ≤ t)."""
        return self._run(tokens)[0]

    def attention_patterns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention patterns ``[n_layers, B, H, T, T]`` (query, key), e.g. for induction scores."""
        return torch.stack(self._run(tokens)[1])

    def _run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        length = tokens.shape[-1]
        if length > self.context:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.context}")
        x = self.embed(tokens) + self.pos_embed(torch.arange(length, device=tokens.device))
        patterns = []
        for block in self.blocks:
            x, pattern = block(x)
            patterns.append(pattern)
        return self.unembed(self.ln_final(x)), patterns


def tokens_of(batch: Batch) -> torch.Tensor:
    """The token tensor ``[B, T]`` of a batch (a tensor, or a list/tuple whose first element is one)."""
    tokens = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise TypeError("batch must be an integer token tensor [B, T] (or a list/tuple starting with one)")
    return tokens


class InductionLM(L.LightningModule):
    """Lightning wrapper: next-token cross entropy on byte windows, AdamW.

    ``per_sample_loss`` is what the package's estimators and callbacks use as ``loss_fn``: the mean
    next-token cross entropy of each window, ``ℓ_z = mean_t −log p(x_{t+1} | x_{≤t})``.

    Args:
        vocab_size: number of token ids.
        d_model: residual stream width.
        n_layers: number of attention-only blocks.
        n_heads: heads per block.
        context: window length.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 8,
        context: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = AttentionOnlyTransformer(vocab_size, d_model, n_layers, n_heads, context)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab_size]``."""
        return self.model(tokens)

    def per_token_loss(self, batch: Batch) -> torch.Tensor:
        """Cross entropy ``[B, T−1]`` of predicting token ``t+1`` from tokens ``≤ t``."""
        tokens = tokens_of(batch)
        logits = self.model(tokens[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return losses.view(tokens.shape[0], tokens.shape[1] - 1)

    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross entropy of each window, ``[B]``."""
        return self.per_token_loss(batch).mean(dim=1)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
