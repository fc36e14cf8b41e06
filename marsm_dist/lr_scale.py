"""The learning-rate scale of the orthogonalized update: W <- W (1 - lr wd) - lr s O, and what s is.

``lr_scale`` (per param group) names the rule that gives s from the matrix's shape (A, B) = (rows,
cols), as the update sees it (see :func:`marsm_dist.orthogonalize.matrix_view_shape`: the first two
dims, or ``(dim0, rest)`` under ``flatten``):

| rule                  | s                     | used by                                            |
|-----------------------|-----------------------|----------------------------------------------------|
| ``"mars_m"``          | 0.2 sqrt(max(A, B))   | MARS-M's reference and Moonlight (the default)     |
| ``"match_rms_adamw"`` | 0.2 sqrt(max(A, B))   | the same value, under ``torch.optim.Muon``'s name  |
| ``"muon"``            | sqrt(max(1, A / B))   | Keller Jordan's Muon; torch's ``"original"``       |
| ``"spectral"``        | sqrt(A / B)           | spectral-norm (modular norm) scaling, unclamped    |
| a callable ``f``      | ``f((A, B))``         | anything else                                      |

The weight decay always uses the unscaled lr. Only ``"mars_m"``/``"match_rms_adamw"`` give the
update an RMS of about 0.2, which lets one lr serve both branches; with the others, tune the
matrix groups' lr separately (e.g. Muon's customary 0.02). Some libraries call sqrt(max(A, B))
"spectral" (with an extra factor); that is ``lambda shape: k * max(shape) ** 0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .functional import update_scale

__all__ = ["LR_SCALES", "LRScale", "callable_name", "check_lr_scale_value", "lr_scale_factor"]

#: What ``lr_scale`` accepts: a rule's name or ``f(shape) -> float``.
LRScale = str | Callable[[tuple[int, int]], float]


def _mars_m(a: int, b: int) -> float:
    return update_scale((a, b))  # the spec's s, written once


LR_SCALES: dict[str, Callable[[int, int], float]] = {
    "mars_m": _mars_m,
    "match_rms_adamw": _mars_m,
    "muon": lambda a, b: math.sqrt(max(1.0, a / b)),
    "spectral": lambda a, b: math.sqrt(a / b),
}


def callable_name(fn: Any) -> str:
    """A callable's name that is the same in every process (``module.qualname``), unlike its repr."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def check_lr_scale_value(value: Any) -> str | None:
    """Why ``value`` is no ``lr_scale``; None if it is one."""
    ok = value in LR_SCALES if isinstance(value, str) else callable(value)
    return None if ok else f"must be one of {', '.join(map(repr, LR_SCALES))} or a callable"


def lr_scale_factor(rule: LRScale, shape: Sequence[int]) -> float:
    """s for a matrix whose update sees ``shape`` (its first two entries are (A, B)).

    Raises:
        ValueError: an unknown rule, or a callable that returns no positive finite number.
    """
    a, b = int(shape[0]), int(shape[1])
    if isinstance(rule, str):
        if rule not in LR_SCALES:
            raise ValueError(f"Invalid lr_scale: {rule!r} ({check_lr_scale_value(rule)})")
        return LR_SCALES[rule](a, b)
    s = rule((a, b))
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
        raise ValueError(f"lr_scale {callable_name(rule)} returned {s!r} for shape {(a, b)}; expected a "
                         "positive finite number")
    return float(s)
