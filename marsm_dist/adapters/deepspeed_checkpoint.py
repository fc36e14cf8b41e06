"""DeepSpeed's side of the neutral checkpoint form (:mod:`marsm_dist.checkpoint`).

ZeRO-3 lists MARSM's fp32 partitions in ``param_groups`` only inside a step (and inside its own
``save_checkpoint``); :func:`zero3_view` lists them while the neutral form walks them. ZeRO-1/2
and the BF16_Optimizer keep them listed, and their partitions are described by the adapter, so
nothing else is needed to export or import MARS-M's state at any stage and world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..optimizer import MARSM

__all__ = ["zero3_view"]


@contextlib.contextmanager
def _all_partitions_listed(wrapper: Any) -> Iterator[None]:
    wrapper._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        wrapper._clear_fp32_optimizer_param_groups()


def zero3_view(wrapper: Any) -> contextlib.AbstractContextManager[None] | None:
    """ZeRO-3 hands MARSM its fp32 partitions only inside a step (and its own checkpointing):
    the neutral checkpoint walks the partitions inside this view (None for other wrappers)."""
    if isinstance(getattr(wrapper, "optimizer", None), MARSM) and hasattr(
            wrapper, "_set_fp32_optimizer_param_groups") and not any(
            g["params"] for g in wrapper.optimizer.param_groups):
        return _all_partitions_listed(wrapper)
    return None
