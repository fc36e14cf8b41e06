"""A Trainer callback that shows what MARS-M's sharded step did (``MARSM.last_step_stats``)."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from transformers import TrainerCallback

from ...stats import StepStats
from ...step_report import step_stats

__all__ = ["MARSMStatsCallback"]

logger = logging.getLogger(__name__)


class MARSMStatsCallback(TrainerCallback):
    """Show, at each of the Trainer's logging steps, what the last MARS-M step did.

    The first process prints one line (matrices it orthogonalized out of those sharded over the
    job, bytes it sent and received, Newton-Schulz time), so a run shows that the work is
    divided; every rank logs its own line at INFO. The figures stay readable afterwards on every
    rank: :attr:`history` holds the last ``keep`` ``(global_step, StepStats)`` pairs.
    """

    def __init__(self, *, print_on_main: bool = True, keep: int = 1000) -> None:
        self.history: deque[tuple[int, StepStats]] = deque(maxlen=keep)
        self.print_on_main = print_on_main

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                    **kwargs: Any) -> None:
        """Record the step's figures (after the optimizer stepped)."""
        stats = step_stats(optimizer)  # all MARSM calls of the step, inside any wrapper
        if stats is not None:
            self.history.append((state.global_step, stats))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Log the last recorded step on this rank."""
        if not self.history:
            return
        step, s = self.history[-1]
        line = (f"MARS-M step {step}, rank {args.process_index} of {args.world_size}: "
                f"orthogonalized {s.owned_matrices} of {s.sharded_matrices} sharded matrices, sent "
                f"{s.bytes_sent / 1e6:.2f} MB, received {s.bytes_received / 1e6:.2f} MB, Newton-Schulz "
                f"{s.milliseconds.get('newton_schulz', 0.0):.1f} ms")
        logger.info(line)
        if self.print_on_main and state.is_world_process_zero:
            print(line, flush=True)
