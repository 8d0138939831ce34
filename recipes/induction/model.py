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
unembedding 64·256 + 256 = 16,640. The recipe's configuration (``configs/base.yaml``: ``d_model`` 128,
context 128) has 215,040.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from typing_extensions import override

from recipes.induction.metrics import AttentionToSource, InContextScore

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
        return self.run(tokens)[1]

    def run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, T, vocab_size]`` and attention patterns ``[n_layers, B, H, T, T]`` in one pass."""
        logits, patterns = self._run(tokens)
        return logits, torch.stack(patterns)

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
    """Lightning wrapper: next-token cross entropy on byte windows, AdamW with linear warm-up, and the
    induction metrics at validation.

    ``per_token_loss`` is the next-token loss at each position, ``ℓ_{z,t} = −log p(x_{t+1} | x_{≤t})``;
    ``per_sample_loss`` is its mean over positions, the per-window loss the package's estimators and
    callbacks use as ``loss_fn``.

    Validation reads three loaders in the order of ``InductionData.val_dataloader``: natural windows
    (``val/loss``), the repeated random probe (``icl/random``, the prefix-matching score of every layer-1
    head ``heads/prefix_l1h{h}``, the previous-token score of every layer-0 head ``heads/prev_l0h{h}``) and
    the repeated natural-text probe (``icl/natural``); see ``recipes.induction.metrics``. Each evaluation is
    appended to ``history``; the first with ``icl/random < onset_threshold`` (``icl/natural <
    natural_onset_threshold``) is the onset, logged once as ``onset/random`` (``onset/natural``), value the
    step.

    The defaults are the small model of the package's benchmarks (d_model 64, context 32); the recipe's
    configuration is ``configs/base.yaml`` (d_model 128, context 128, lr 6e-3, betas (0.9, 0.98),
    100 warm-up steps).

    Args:
        vocab_size: number of token ids.
        d_model: residual stream width.
        n_layers: number of attention-only blocks.
        n_heads: heads per block.
        context: window length.
        lr: AdamW learning rate (reached after the warm-up, then constant).
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_steps: steps of linear learning-rate warm-up from ``lr / warmup_steps``.
        onset_threshold: onset threshold of the random-probe in-context score.
        natural_onset_threshold: onset threshold of the natural-probe in-context score.
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
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        onset_threshold: float = -2.0,
        natural_onset_threshold: float = -0.3,
    ) -> None:
        super().__init__()
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 (previous-token and induction layers), got {n_layers}")
        self.save_hyperparameters()
        self.model = AttentionOnlyTransformer(vocab_size, d_model, n_layers, n_heads, context)
        self.val_loss = MeanMetric()
        self.icl_random = InContextScore()
        self.icl_natural = InContextScore()
        self.prefix_matching = AttentionToSource("prefix", n_heads)
        self.previous_token = AttentionToSource("previous", n_heads)
        self.history: list[dict[str, float]] = []
        self.onsets: dict[str, int] = {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, vocab_size]``."""
        return self.model(tokens)

    def per_token_loss(self, batch: Batch) -> torch.Tensor:
        """Cross entropy ``[B, T−1]`` of predicting token ``t+1`` from tokens ``≤ t``."""
        tokens = tokens_of(batch)
        return token_losses(self.model(tokens[:, :-1]), tokens)

    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross entropy of each window, ``[B]``."""
        return self.per_token_loss(batch).mean(dim=1)

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.per_token_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        tokens = tokens_of(batch)
        if dataloader_idx == 0:
            self.val_loss.update(self.per_token_loss(tokens))
        elif dataloader_idx == 1:
            logits, patterns = self.model.run(tokens)  # causal: logits[:, :T−1] are per_token_loss's
            self.icl_random.update(token_losses(logits, tokens))
            self.previous_token.update(patterns[0])
            self.prefix_matching.update(patterns[1])
        elif dataloader_idx == 2:
            self.icl_natural.update(self.per_token_loss(tokens))
        else:
            raise ValueError(f"unexpected validation dataloader {dataloader_idx} (expected 0, 1 or 2)")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            for metric in self._metrics():
                metric.reset()
            return
        values = {
            "val/loss": float(self.val_loss.compute()),
            "icl/random": float(self.icl_random.compute()),
            "icl/random_first_copy": float(self.icl_random.first_copy_loss()),
            "icl/random_second_copy": float(self.icl_random.second_copy_loss()),
            "icl/natural": float(self.icl_natural.compute()),
            "icl/natural_first_copy": float(self.icl_natural.first_copy_loss()),
            "icl/natural_second_copy": float(self.icl_natural.second_copy_loss()),
        }
        prefix, previous = self.prefix_matching.compute(), self.previous_token.compute()
        values.update({f"heads/prefix_l1h{h}": float(v) for h, v in enumerate(prefix)})
        values.update({f"heads/prev_l0h{h}": float(v) for h, v in enumerate(previous)})
        values["heads/prefix_max"] = float(prefix.max())
        values["heads/prev_max"] = float(previous.max())
        for metric in self._metrics():
            metric.reset()
        step = int(self.trainer.global_step)
        for probe, threshold in [
            ("random", self.hparams.onset_threshold),
            ("natural", self.hparams.natural_onset_threshold),
        ]:
            if probe not in self.onsets and values[f"icl/{probe}"] < threshold:
                self.onsets[probe] = step
                values[f"onset/{probe}"] = float(step)
        self.log_dict(values)
        self.history.append({"step": step, **values})

    def _metrics(self) -> list[Metric]:
        return [self.val_loss, self.icl_random, self.icl_natural, self.prefix_matching, self.previous_token]

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["induction_history"] = {"history": self.history, "onsets": self.onsets}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("induction_history", {})
        self.history = list(saved.get("history", []))
        self.onsets = dict(saved.get("onsets", {}))

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
        )
        warmup = self.hparams.warmup_steps

        def factor(step: int) -> float:
            return min(1.0, (step + 1) / warmup) if warmup else 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross entropy ``[B, T−1]`` of logits ``[B, ≥T−1, V]`` (position ``t`` predicts token ``t+1``)."""
    length = tokens.shape[1] - 1
    flat = logits[:, :length].flatten(0, 1)
    return F.cross_entropy(flat, tokens[:, 1:].flatten(), reduction="none").view(tokens.shape[0], length)
