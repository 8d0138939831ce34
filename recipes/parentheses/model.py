"""A small transformer encoder that classifies parenthesis strings as balanced or not
(Wang & Murfet 2026, arXiv 2601.13548).

Architecture: token + learned positional embedding, ``n_layers`` pre-LayerNorm blocks
``x = x + attn(LN(x)); x = x + mlp(LN(x))`` with bidirectional attention over the non-padding
positions, a final LayerNorm, and a linear read-out of 2 logits (FALSE, TRUE) from the CLS position
(``pooling="cls"``) or from the mean over the non-padding positions (``pooling="mean"``).

Attention is written with explicit matmuls and a key-padding mask (no fused kernels), with separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear layers, so that the forward works under
``torch.func.vmap`` (stacked SGLD chains) and ``lp.attention.head_restrictions`` finds the heads.

``ParenthesesClassifier.per_sample_loss`` is the cross entropy of each string, the ``loss_fn`` of the
package's estimators and callbacks. Validation logs the in-distribution accuracy and the *nested score*,
the fraction of OOD strings (equal counts, not nested) answered FALSE: the learned rule is called NESTED
if it is above 0.5, EQUAL-COUNT otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

from recipes.parentheses.data import PAD, VOCAB_SIZE, boundary_violations, min_prefix_depths

Batch = Sequence[torch.Tensor]
"""``(tokens [B, T], labels [B], indices [B])``; only the first two are used."""

POOLINGS = ("cls", "mean", "last")


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key-padding mask (and optionally a causal mask).

    ``out = o_proj(concat_h softmax(q_h k_hᵀ / √d_h + mask) v_h)``, the mask setting padded keys (and,
    when ``causal``, keys after the query) to −∞.

    Args:
        d_model: residual stream width.
        n_heads: number of heads; must divide ``d_model``.
        causal: whether position ``t`` attends only to positions ``<= t``.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend over ``x`` ``[B, T, d_model]``; ``padding`` ``[B, T]`` is True at padded positions.

        Returns:
            The output ``[B, T, d_model]`` and the attention pattern ``[B, H, T, T]`` (query, key).
        """
        batch, length, width = x.shape
        shape = (batch, length, self.n_heads, self.d_head)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, T, d_h]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # [B, H, T, T]
        masked = padding[:, None, None, :]
        if self.causal:
            later = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(diagonal=1)
            masked = masked | later
        scores = scores.masked_fill(masked, float("-inf"))
        pattern = scores.softmax(dim=-1)
        z = (pattern @ v).transpose(1, 2).reshape(batch, length, width)
        return self.o_proj(z), pattern


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))`` (GELU MLP)."""

    def __init__(self, d_model: int, n_heads: int, d_mlp: int, causal: bool = False) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, causal)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, pattern = self.attn(self.ln_attn(x), padding)
        x = x + out
        return x + self.mlp(self.ln_mlp(x)), pattern


class ParenthesesTransformer(nn.Module):
    """Transformer encoder: tokens ``[B, T]`` (CLS first) → logits ``[B, 2]`` (FALSE, TRUE).

    Args:
        d_model: residual stream width.
        n_layers: number of blocks.
        n_heads: heads per block.
        d_mlp: hidden width of the MLPs.
        max_length: longest string; positions ``0 … max_length`` (CLS included) are embedded.
        pooling: ``"cls"`` (read out the CLS position), ``"mean"`` (mean over non-padding positions) or
            ``"last"`` (the last non-padding position).
        causal: causal (decoder-style) attention: position ``t`` sees positions ``<= t`` only, so each
            position can read its own prefix's depth. Use it with ``"mean"`` or ``"last"`` pooling (the
            CLS position then sees only itself).
    """

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_mlp: int = 128,
        max_length: int = 20,
        pooling: str = "cls",
        causal: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.max_length = max_length
        self.pooling = pooling
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos_embed = nn.Embedding(max_length + 1, d_model)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_mlp, causal) for _ in range(n_layers))
        self.ln_final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]`` for tokens ``[B, T]``."""
        return self._run(tokens)[0]

    def attention_patterns(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention patterns ``[n_layers, B, H, T, T]`` (query, key)."""
        return torch.stack(self._run(tokens)[1])

    def _run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        length = tokens.shape[-1]
        if length > self.max_length + 1:
            raise ValueError(f"{length} tokens exceed max_length + 1 = {self.max_length + 1}")
        padding = tokens == PAD
        x = self.embed(tokens) + self.pos_embed(torch.arange(length, device=tokens.device))
        patterns = []
        for block in self.blocks:
            x, pattern = block(x, padding)
            patterns.append(pattern)
        x = self.ln_final(x)
        if self.pooling == "cls":
            pooled = x[:, 0]
        elif self.pooling == "last":
            last = (~padding).long().sum(dim=1) - 1  # CLS first, no gaps: the last real position
            pooled = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        else:
            keep = (~padding).to(x.dtype)[..., None]
            pooled = (x * keep).sum(dim=1) / keep.sum(dim=1)
        return self.head(pooled), patterns


def split_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [B, T], labels [B])`` of a batch ``(tokens, labels, …)``."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("batch must be a list/tuple (tokens [B, T], labels [B], ...)")
    tokens, labels = batch[0], batch[1]
    if tokens.ndim != 2 or tokens.is_floating_point():
        raise TypeError(f"tokens must be an integer tensor [B, T], got {tokens.dtype} {list(tokens.shape)}")
    return tokens, labels


class ParenthesesClassifier(L.LightningModule):
    """Lightning wrapper: per-string cross entropy, AdamW, and the nested score at validation.

    Validation (dataloader 0: in-distribution, 1: OOD) logs ``val/accuracy``, ``val/nested_score``
    (fraction of OOD strings answered FALSE) and the nested score split by how far the OOD string dips
    below zero (``val/nested_score_dip1``: min prefix depth −1; ``val/nested_score_dip2plus``: ≤ −2).

    Args:
        d_model: residual stream width.
        n_layers: number of blocks.
        n_heads: heads per block.
        d_mlp: MLP hidden width.
        max_length: longest string (match the data's ``max_length``).
        pooling: ``"cls"``, ``"mean"`` or ``"last"``.
        causal: causal (decoder-style) attention.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warm-up from 0.
        cosine: after warm-up, decay the learning rate to 0 along a half cosine over the remaining
            ``trainer.estimated_stepping_batches`` (otherwise keep it constant).
        label_smoothing: ε of the training loss (``F.cross_entropy``'s label smoothing): the target puts
            ``1 − ε/2`` on the label. With ε > 0 the loss has a minimum at finite logits (gap
            ``log((2 − ε)/ε)``), so a trained model sits at a genuine minimum instead of on a flat,
            saturated slope; the LLC route uses it for its reference solutions.
    """

    def __init__(
        self,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_mlp: int = 128,
        max_length: int = 20,
        pooling: str = "cls",
        causal: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        cosine: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.model = ParenthesesTransformer(d_model, n_layers, n_heads, d_mlp, max_length, pooling, causal)
        self.val_accuracy = BinaryAccuracy()
        self.nested_score = MeanMetric()
        self.nested_score_dip1 = MeanMetric()
        self.nested_score_dip2plus = MeanMetric()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 2]`` (FALSE, TRUE)."""
        return self.model(tokens)

    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        """Cross entropy of each string (label-smoothed by ``label_smoothing``), ``[B]``."""
        tokens, labels = split_batch(batch)
        return F.cross_entropy(
            self.model(tokens), labels, reduction="none", label_smoothing=self.hparams.label_smoothing
        )

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        tokens, labels = split_batch(batch)
        logits = self.model(tokens)
        predictions = logits.argmax(-1)
        if dataloader_idx == 0:
            self.val_accuracy.update(predictions, labels)
            self.log("val/loss", F.cross_entropy(logits, labels), add_dataloader_idx=False)
            self.log("val/accuracy", self.val_accuracy, prog_bar=True, add_dataloader_idx=False)
            return
        answered_false = (predictions == 0).float()
        dips = min_prefix_depths(tokens)
        self.nested_score.update(answered_false)
        self.log("val/nested_score", self.nested_score, prog_bar=True, add_dataloader_idx=False)
        for metric, selected in [
            (self.nested_score_dip1, dips == -1),
            (self.nested_score_dip2plus, dips <= -2),
        ]:
            if selected.any():
                metric.update(answered_false[selected])
        self.log("val/nested_score_dip1", self.nested_score_dip1, add_dataloader_idx=False)
        self.log("val/nested_score_dip2plus", self.nested_score_dip2plus, add_dataloader_idx=False)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup, total = self.hparams.warmup_steps, 0
        if self.hparams.cosine:
            total = int(self.trainer.estimated_stepping_batches)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total > warmup:
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
            return 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def answers(model: ParenthesesTransformer | ParenthesesClassifier, tokens: torch.Tensor) -> torch.Tensor:
    """The class ``model`` answers for each string of ``tokens`` (1 = TRUE), in eval mode without grad, in
    batches of 1024; the model's train/eval mode is restored afterwards."""
    network = model.model if isinstance(model, ParenthesesClassifier) else model
    was_training = network.training
    network.eval()
    with torch.no_grad():
        out = torch.cat([network(tokens[i : i + 1024]).argmax(-1) for i in range(0, len(tokens), 1024)])
    network.train(was_training)
    return out


def evaluate(
    model: ParenthesesTransformer | ParenthesesClassifier,
    val_tokens: torch.Tensor,
    val_labels: torch.Tensor,
    ood_tokens: torch.Tensor,
) -> dict[str, float]:
    """In-distribution accuracy and nested scores of ``model`` (in eval mode, no grad).

    Returns:
        ``accuracy``; ``nested_score`` (fraction of OOD strings answered FALSE) and its split by dip
        depth (``nested_score_dip1``, ``nested_score_dip2plus``) and by whether the string starts with
        ``")"`` or ends with ``"("`` (``nested_score_boundary``, ``nested_score_interior``); the OOD
        fractions of each split (``frac_dip1``, ``frac_boundary``). A split with no strings gives NaN.
    """
    accuracy = (answers(model, val_tokens) == val_labels).float().mean().item()
    answered_false = (answers(model, ood_tokens) == 0).float()
    dips = min_prefix_depths(ood_tokens)
    boundary = boundary_violations(ood_tokens)

    def mean(selected: torch.Tensor) -> float:
        return answered_false[selected].mean().item() if selected.any() else float("nan")

    return {
        "accuracy": accuracy,
        "nested_score": answered_false.mean().item(),
        "nested_score_dip1": mean(dips == -1),
        "nested_score_dip2plus": mean(dips <= -2),
        "nested_score_boundary": mean(boundary),
        "nested_score_interior": mean(~boundary),
        "frac_dip1": (dips == -1).float().mean().item(),
        "frac_boundary": boundary.float().mean().item(),
    }
