"""How the optimizer learns what a parameter's local shard is, without knowing any framework.

An adapter answers, for the parameters it recognizes: the local tensor behind a parameter, grad
or state tensor; the process group its shards are spread over; the piece layout of a matrix;
and how to create a state tensor that the framework's checkpointing saves correctly. Adapters
register themselves (``marsm_dist.adapters.*``); a plain tensor is a world of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import MatrixLayout, whole

__all__ = ["ShardingAdapter", "adapter_for", "register_adapter"]


class ShardingAdapter:
    """The base adapter: a plain, unsharded tensor (every rank holds all of it, or one process).

    Subclasses override :meth:`handles` and whatever differs for their framework.
    """

    name = "plain"
    #: Create state for every parameter when the optimizer is built (rank-symmetric checkpoint
    #: keys). False where the framework swaps parameters after construction (ZeRO).
    prepopulate_state = False

    def handles(self, p: Tensor) -> bool:
        return True

    def local(self, t: Tensor) -> Tensor:
        """The local tensor behind a parameter, gradient or state tensor (in-place writes stick)."""
        return t

    def zeros_state(self, p: Tensor) -> Tensor:
        """A zero state tensor for ``p``, in the form the framework's checkpointing expects."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The group ``p``'s shards are spread over, or None when this process holds all of it."""
        return None

    def layout(self, p: Tensor) -> MatrixLayout:
        """The pieces every rank of :meth:`process_group` holds of ``p``."""
        return whole(tuple(p.shape))


_PLAIN = ShardingAdapter()
_ADAPTERS: list[ShardingAdapter] = []


def register_adapter(adapter: ShardingAdapter) -> None:
    """Make ``adapter`` known to every MARSM optimizer (later registrations are asked first)."""
    if all(type(a) is not type(adapter) for a in _ADAPTERS):
        _ADAPTERS.insert(0, adapter)


def adapter_for(p: Tensor) -> ShardingAdapter:
    """The adapter that handles ``p`` (the plain one when none claims it)."""
    for adapter in _ADAPTERS:
        if adapter.handles(p):
            return adapter
    return _PLAIN
