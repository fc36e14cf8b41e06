"""Find the ``MARSM`` instances inside whatever a framework wraps them in, and report one
training step's figures for all of them together.

Trainers and engines hand the user a wrapper, not the optimizer: Accelerate's
``AcceleratedOptimizer``, DeepSpeed's ZeRO optimizers and engine, Megatron's
``ChainedOptimizer`` (one inner optimizer per set of groups), torchtitan's container (one per
model part). :func:`step_stats` sums ``MARSM.last_step_stats`` over every MARSM found, so the
figures cover the whole training step however the framework split it.
"""

from __future__ import annotations

from functools import reduce
from typing import Any

from .optimizer import MARSM
from .stats import StepStats

__all__ = ["marsm_optimizers", "step_stats"]

# Where wrappers keep what they wrap: one optimizer, or a list/dict of them.
_INNER = ("optimizer", "basic_optimizer", "chained_optimizers", "optimizers")
_MAX_DEPTH = 8


def marsm_optimizers(wrapper: Any) -> list[MARSM]:
    """Every ``MARSM`` reachable from ``wrapper`` (itself included), each once, in order."""
    found: dict[int, MARSM] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > _MAX_DEPTH:
            return
        seen.add(id(obj))
        if isinstance(obj, MARSM):
            found.setdefault(id(obj), obj)
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
            return
        if isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
            return
        for name in _INNER:
            inner = getattr(obj, name, None)
            if inner is not None and not callable(inner):  # an attribute, not a method
                visit(inner, depth + 1)

    visit(wrapper, 0)
    return list(found.values())


def step_stats(wrapper: Any) -> StepStats | None:
    """The last training step's figures of every ``MARSM`` inside ``wrapper``, added up (bytes,
    owned and sharded matrices, time per phase); None before the first step."""
    stats = [opt.last_step_stats for opt in marsm_optimizers(wrapper) if opt.last_step_stats is not None]
    return reduce(lambda a, b: a + b, stats) if stats else None
