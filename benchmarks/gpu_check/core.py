"""What every section shares: the run context, timestamped progress, timing, and the section runner
that turns a section's outcome into one JSON record."""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
_START = time.monotonic()


class Skip(Exception):
    """Raised by a section (or check) that cannot run here; the message is the recorded reason,
    ``figures`` (e.g. the error of a helper that failed) are recorded beside it."""

    def __init__(self, reason: str, **figures: Any) -> None:
        super().__init__(reason)
        self.figures = figures


@dataclass
class Ctx:
    """One run: dry (CPU, tiny sizes) or GPU, and what earlier sections found."""

    dry: bool
    device: torch.device
    tmp: Path
    frameworks: bool = False  # dry mode: also run the DeepSpeed / Megatron checks on the CPU
    llama_layers: int = 8
    found: dict[str, dict] = field(default_factory=dict)  # section name -> its record


def log(msg: str) -> None:
    """One progress line with wall-clock time and seconds since start, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _START:6.1f}s] {msg}", flush=True)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events on a GPU (GPU time between
    two points of the stream), the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    """The median (a thin alias so sections read plainly)."""
    return statistics.median(values)


def run_checks(checks: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Run independent checks of one section, each recorded like a section (see :func:`record`)."""
    out = {}
    for name, fn in checks.items():
        log(f"  check {name}")
        out[name] = record(fn)
        log(f"  check {name}: {out[name]['status']}")
    return out


def record(fn: Callable[[], dict]) -> dict[str, Any]:
    """Call ``fn`` and describe the outcome: ``{"status": "ok", **figures}``, ``{"status":
    "skipped", "reason"}`` or ``{"status": "failed", "error", "traceback"}``.

    Failures are data, never hidden: an exception fails; figures with a non-empty ``problems``
    list fail (a check that ran but missed its bar); nested ``checks`` fail the whole if any of
    them failed, and skip it only if all of them were skipped.
    """
    t0 = time.monotonic()
    try:
        figures = dict(fn() or {})
    except Skip as why:
        return {"status": "skipped", "reason": str(why), "seconds": round(time.monotonic() - t0, 2),
                **why.figures}
    except Exception as err:
        return {"status": "failed", "error": f"{type(err).__name__}: {err}"[:2000],
                "traceback": traceback.format_exc()[-4000:], "seconds": round(time.monotonic() - t0, 2)}
    finally:
        _release_memory()
    seconds = round(time.monotonic() - t0, 2)
    checks = figures.get("checks", {})
    failed = [n for n, c in checks.items() if c["status"] == "failed"]
    problems = list(figures.get("problems", [])) + [f"check {n} failed: {checks[n]['error']}" for n in failed]
    if problems:
        return {"status": "failed", "error": "; ".join(problems)[:2000], "seconds": seconds, **figures}
    if checks and all(c["status"] == "skipped" for c in checks.values()):
        reason = "; ".join(f"{n}: {c['reason']}" for n, c in checks.items())
        return {"status": "skipped", "reason": reason, "seconds": seconds, **figures}
    return {"status": "ok", "seconds": seconds, **figures}


def _release_memory() -> None:
    # A section's tensors are gone when it returns; hand the cached blocks back so the next
    # section (or a subprocess on the same GPU) gets the memory.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
