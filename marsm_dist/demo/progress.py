"""A one-line progress bar on stderr: loss, tokens/s and optimizer-step time of the current run.

On a terminal the line is redrawn in place (at most 10 times a second); in a log file or a pipe
it becomes one line every ``log_every`` steps, so CI logs stay short and readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Progress of one training run of ``total`` steps of ``tokens_per_step`` tokens each."""

    def __init__(self, label: str, total: int, tokens_per_step: int, log_every: int = 25,
                 stream: TextIO | None = None, width: int = 24) -> None:
        self.label, self.total, self.tokens_per_step = label, total, tokens_per_step
        self.log_every, self.width = max(1, log_every), width
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self.start = time.perf_counter()
        self._drawn = 0.0

    def update(self, step: int, result, opt_seconds: float) -> None:
        """Show step ``step`` (1-based) of ``result`` (a train.Result); signature of train's ``on_step``."""
        now = time.perf_counter()
        done = step == self.total
        if self.live and not done and now - self._drawn < 0.1:
            return
        if not self.live and not done and step % self.log_every:
            return
        self._drawn = now
        elapsed = now - self.start
        filled = self.width * step // self.total
        bar = "#" * filled + "." * (self.width - filled)
        eta = elapsed / step * (self.total - step)
        line = (f"{self.label:>6} [{bar}] {step:>{len(str(self.total))}}/{self.total}  "
                f"loss {result.losses[-1]:.4f}  {self.tokens_per_step * step / elapsed:>8,.0f} tok/s  "
                f"opt step {1e3 * opt_seconds / step:6.1f} ms  {_clock(elapsed)}<{_clock(eta)}")
        self.stream.write(("\r" + line + "\033[K") if self.live else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
