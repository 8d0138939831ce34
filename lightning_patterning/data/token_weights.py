"""``weighted_loss``: the one line that brings per-token patterning weights into a ``training_step``.

::

    def training_step(self, batch, batch_idx):
        return lp.weighted_loss(self.per_token_loss(batch), batch, self)

The weights come from the :class:`~lightning_patterning.patterning.tokens.TokenWeightRule` held by the
Trainer's :class:`~lightning_patterning.data.datamodule.PatterningDataModule` (``token_classes=``), and are
computed from the batch itself on the device it is on: every DDP rank applies the same rule state (set
identically on every rank by ``PatterningCallback`` or by the user) to its own batch, nothing is attached
to the batch, and the SGLD estimators keep calling the user's loss function on the user's batches. The
rule state lives in the DataModule's ``state_dict``, so a resumed run applies the weights it had.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_patterning.patterning.tokens import TokenWeightRule, weighted_mean
from lightning_patterning.sgld.functional import masked_mean, split_loss_output

WeightSource = pl.LightningModule | TokenWeightRule | None


def weighted_loss(losses: Tensor | tuple[Tensor, Tensor], batch: Any, source: WeightSource) -> Tensor:
    """The training loss of per-position losses under the current per-token weights.

    ``L_w = Σ m·w·ℓ / Σ m·w`` over the batch's valid positions (``m``: the mask, ``w``: the rule's weight of
    each token), i.e. weights normalised to mean 1 over the batch's valid tokens; with no rule in effect it
    is the plain mean over valid positions, ``Σ m·ℓ / Σ m`` (the same number ``estimate_llc`` uses).

    Args:
        losses: per-position losses ``[B, T]``, or ``(losses [B, T], mask [B, T])``: what the module's
            ``loss_fn`` / ``per_sample_loss`` returns for tokens as samples. Per-sample losses ``[B]`` are
            averaged (no token weights can apply to them).
        batch: the batch the losses were computed on (the rule's ``token_classes(batch)`` must have the
            losses' shape).
        source: where the weights come from. The ``LightningModule`` itself (``self``): the rule of the
            Trainer's ``PatterningDataModule``, applied only while the Trainer is training (validation
            and test steps get the plain mean, so a shared step stays comparable across runs); plain mean
            when there is no Trainer, no ``PatterningDataModule`` or no ``token_classes``. A
            ``TokenWeightRule``: that rule, always (e.g. with ``trainer.fit(train_dataloaders=...)``; then
            checkpoint ``rule.state_dict()`` yourself). ``None``: the plain mean.

    Raises:
        ValueError: the rule's ``token_classes(batch)`` does not have the shape of ``losses``, or token
            weights are asked for per-sample losses.
    """
    values, mask = split_loss_output(losses)
    rule = _rule(source)
    if rule is None:
        return masked_mean(values, mask)
    if values.ndim != 2:
        raise ValueError(
            "weighted_loss: per-token weights need per-position losses [B, T], got shape "
            f"{list(values.shape)}"
        )
    return weighted_mean(values, rule(batch), mask)


def token_weights(batch: Any, source: WeightSource) -> Tensor | None:
    """``[B, T]`` weights ``weighted_loss`` would apply to ``batch`` (before the per-batch normalisation),
    or ``None`` when no rule is in effect."""
    rule = _rule(source)
    return None if rule is None else rule(batch)


def _rule(source: WeightSource) -> TokenWeightRule | None:
    if source is None or isinstance(source, TokenWeightRule):
        return source
    if not isinstance(source, pl.LightningModule):
        raise TypeError(
            "weighted_loss: source must be the LightningModule (self), a TokenWeightRule or None, got "
            f"{type(source).__name__}"
        )
    trainer = source._trainer
    if trainer is None or not trainer.training:
        return None
    return getattr(trainer.datamodule, "token_rule", None)
