"""Lightning adapters over the functional core."""

from lightning_patterning.callbacks.llc_callback import LLCCallback
from lightning_patterning.callbacks.schedule import Schedule
from lightning_patterning.callbacks.susceptibility_callback import SusceptibilityCallback

__all__ = ["LLCCallback", "Schedule", "SusceptibilityCallback"]
