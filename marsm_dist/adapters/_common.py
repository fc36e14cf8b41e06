"""What every framework adapter refuses the same way."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["refuse_exact_mode"]


def refuse_exact_mode(approx: Iterable[object], message: str) -> None:
    """Raise ``NotImplementedError(message)`` if any of the ``approx`` settings is ``False``.

    MARSM's exact mode needs the look-ahead gradient (a second backward pass, then
    ``store_lookahead_grad()``) before every step. A framework whose loop runs one backward and
    then steps the optimizer itself (DeepSpeed's engine, Megatron's training loop) never provides
    it, so the adapter refuses the mode when the optimizer is built, instead of the first step
    failing inside MARSM. ``message`` says why for that framework.
    """
    if any(a is False for a in approx):
        raise NotImplementedError(message)
