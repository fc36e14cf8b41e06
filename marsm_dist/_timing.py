"""Wall-clock time per step phase, for the optimizer's diagnostics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.autograd.profiler import record_function

PHASES = ("elementwise", "communication", "newton_schulz", "apply")


def _profiling() -> bool:
    return torch._C._autograd._profiler_enabled()


class PhaseTimer:
    """Accumulates seconds per phase; each phase is also a profiler range ``marsm::<phase>``.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs at both ends of a phase when given: without
    it, GPU timings only measure kernel launches.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        start = time.perf_counter()
        if _profiling():
            with record_function(f"marsm::{name}"):
                yield
        else:  # a range costs ~11 us even with no profiler; a step opens dozens
            yield
        if self.sync is not None:
            self.sync()
        self.seconds[name] += time.perf_counter() - start

    def milliseconds(self) -> dict[str, float]:
        return {k: 1e3 * v for k, v in self.seconds.items()}
