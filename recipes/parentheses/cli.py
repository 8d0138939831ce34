"""LightningCLI entry for the parentheses recipe: ``python -m recipes.parentheses fit --config …``.

The data's ``max_length`` is linked to the model's (set it under ``data:`` only). After ``fit`` the CLI
evaluates the trained model on the in-distribution validation set and the OOD test set, prints the
in-distribution accuracy and the nested score (with its splits, see ``model.evaluate``), logs them as
``final/…`` scalars and keeps them in ``cli.final_metrics``.

The ``sampling:`` section (``patterning.Sampling``) wraps the data in ``lp.PatterningDataModule`` for the
patterning arms (``configs/arms/*.yaml``); without it the data module is used as is.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recipes.parentheses.data import ParenthesesData
from recipes.parentheses.model import ParenthesesClassifier, evaluate
from recipes.parentheses.patterning import Sampling, wrap


class ParenthesesCLI(LightningCLI):
    """``LightningCLI`` for ``ParenthesesClassifier`` + ``ParenthesesData`` with a final evaluation."""

    final_metrics: dict[str, float]

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.max_length", "model.max_length")
        parser.add_class_arguments(Sampling, "sampling", instantiate=False)

    def instantiate_classes(self) -> None:
        """As usual, then wrap the data for weighted sampling when ``sampling.groups`` is set."""
        super().instantiate_classes()
        options = self._get(self.config, "sampling")
        sampling = Sampling(**{f.name: options[f.name] for f in fields(Sampling)})
        seed = self._get(self.config, "seed_everything")
        self.datamodule = wrap(self.datamodule, sampling, int(seed) if seed is not None else 0)

    def after_fit(self) -> None:
        """Evaluate the trained model, print the result and log it as ``final/…``."""
        data = self.datamodule
        self.final_metrics = evaluate(
            self.model, data.val_set.tokens, data.val_set.labels, data.ood_test.tokens
        )
        rule = "NESTED" if self.final_metrics["nested_score"] > 0.5 else "EQUAL-COUNT"
        metrics = self.final_metrics
        print(
            f"final: in-distribution accuracy {metrics['accuracy']:.4f}, nested score "
            f"{metrics['nested_score']:.3f} (dip −1: {metrics['nested_score_dip1']:.3f}, dip ≤ −2: "
            f"{metrics['nested_score_dip2plus']:.3f}) → {rule}"
        )
        for logger in self.trainer.loggers:
            logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=self.trainer.global_step)


def main(args: list[str] | None = None, run: bool = True, **kwargs: Any) -> ParenthesesCLI:
    """Build (and with ``run=True`` run) the CLI; ``args`` default to ``sys.argv[1:]``.

    Extra keyword arguments go to ``LightningCLI`` (e.g. ``save_config_callback=None``).
    """
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return ParenthesesCLI(ParenthesesClassifier, ParenthesesData, args=args, run=run, **kwargs)
