"""When an estimation callback runs: every N optimizer steps, every N epochs, or at log-spaced steps."""

from __future__ import annotations

import math


class Schedule:
    """A run schedule over optimizer steps (``trainer.global_step``) and epochs.

    Args:
        every_n_train_steps: run at every step that is a positive multiple of this.
        every_n_epochs: run at the end of every epoch whose number (1-based) is a multiple of this.
        log_spaced_steps: run at this many steps spaced evenly in log-space between ``first_step`` and
            ``last_step`` (structure forms early, so early checkpoints deserve denser estimates).
        first_step: first step of the log-spaced schedule (≥ 1).
        last_step: last step of the log-spaced schedule; ``None`` takes the Trainer's ``max_steps`` (or its
            estimated number of steps) at setup.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        log_spaced_steps: int | None = None,
        first_step: int = 1,
        last_step: int | None = None,
    ) -> None:
        for name, value in (
            ("every_n_train_steps", every_n_train_steps),
            ("every_n_epochs", every_n_epochs),
            ("log_spaced_steps", log_spaced_steps),
            ("last_step", last_step),
        ):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        if not isinstance(first_step, int) or first_step < 1:
            raise ValueError(f"first_step must be an int >= 1, got {first_step!r}")
        if log_spaced_steps is None and (first_step != 1 or last_step is not None):
            raise ValueError(
                "first_step and last_step bound the log-spaced schedule only: set log_spaced_steps, or "
                f"leave them at their defaults (got first_step={first_step!r}, last_step={last_step!r})"
            )
        if last_step is not None and last_step < first_step:
            raise ValueError(f"last_step ({last_step}) must be >= first_step ({first_step})")
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.log_spaced_steps = log_spaced_steps
        self.first_step = first_step
        self.last_step = last_step
        self._log_steps: frozenset[int] = frozenset()
        if log_spaced_steps is not None and last_step is not None:
            self.resolve(last_step)

    @property
    def is_empty(self) -> bool:
        return (
            self.every_n_train_steps is None and self.every_n_epochs is None and self.log_spaced_steps is None
        )

    def resolve(self, max_steps: int) -> None:
        """Fix the log-spaced steps once the run length is known."""
        if self.log_spaced_steps is None:
            return
        last = self.last_step if self.last_step is not None else max_steps
        if last < 1:
            raise ValueError(
                "log_spaced_steps needs a known run length: set last_step, "
                "or the Trainer's max_steps / max_epochs"
            )
        self._log_steps = frozenset(
            log_spaced(self.first_step, max(last, self.first_step), self.log_spaced_steps)
        )

    @property
    def log_steps(self) -> list[int]:
        """The resolved log-spaced steps (empty until ``resolve``)."""
        return sorted(self._log_steps)

    def at_step(self, step: int) -> bool:
        """Whether to run after optimizer step ``step``."""
        if step < 1:
            return False
        if self.every_n_train_steps is not None and step % self.every_n_train_steps == 0:
            return True
        return step in self._log_steps

    def at_epoch_end(self, epoch: int) -> bool:
        """Whether to run at the end of epoch ``epoch`` (0-based)."""
        return self.every_n_epochs is not None and (epoch + 1) % self.every_n_epochs == 0


def log_spaced(first: int, last: int, count: int) -> list[int]:
    """``count`` integer steps from ``first`` to ``last`` evenly spaced in log-space (duplicates removed)."""
    if count == 1:
        return [last]
    ratio = math.log(last / first) / (count - 1)
    return sorted({round(first * math.exp(ratio * i)) for i in range(count)})
