"""The sharding engine: piece layouts, the owner plan, and the gather/scatter exchange.

It knows ``torch.distributed`` but no training framework: adapters describe their shards as
:class:`MatrixLayout` pieces through a :class:`ShardingAdapter` that the optimizer asks (see
:mod:`.adapter` for when each is registered, and in which order they are asked).
"""

from .adapter import (
    ShardingAdapter,
    Slot,
    adapter_for,
    check_group_serves,
    register_adapter,
    registered_adapters,
    slot_view,
)
from .engine import ShardingEngine
from .layout import MatrixLayout, Piece, assemble, cut, row_chunks, whole
from .offload import Staging, group_device
from .plan import OWNER_POLICIES, ExchangePlan, make_plan

__all__ = [
    "OWNER_POLICIES",
    "ExchangePlan",
    "MatrixLayout",
    "Piece",
    "ShardingAdapter",
    "ShardingEngine",
    "Slot",
    "Staging",
    "adapter_for",
    "assemble",
    "check_group_serves",
    "cut",
    "group_device",
    "make_plan",
    "register_adapter",
    "registered_adapters",
    "row_chunks",
    "slot_view",
    "whole",
]
