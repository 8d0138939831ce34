"""``python -m examples.lightningcli fit --config examples/lightningcli/config.yaml``."""

import lightning as L
from lightning.pytorch.cli import LightningCLI

from examples.lightningcli.model import Regressor


def main(args: list[str] | None = None) -> LightningCLI:
    """The CLI; the YAML picks the DataModule (``subclass_mode_data``), so it can wrap one in
    ``lp.PatterningDataModule``."""
    return LightningCLI(
        Regressor,
        L.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
