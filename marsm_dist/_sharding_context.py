"""Per-optimizer sharding context: each parameter's adapter, the engine, the statistics reduce.

Built on the first step (and rebuilt if the param groups change), so frameworks that swap
parameters after the optimizer is constructed (ZeRO) are seen as they are when training starts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._timing import PhaseTimer
from .sharding.adapter import ShardingAdapter, Slot, adapter_for, check_group_serves
from .sharding.engine import ShardingEngine

Group = dict[str, Any]


class ShardingContext:
    """What the optimizer needs to know about how its parameters are sharded."""

    def __init__(self, param_groups: list[Group], uses_marsm: Callable[[Group, Slot], bool],
                 name_of: Callable[[Group, int], str], *, owner_policy: str, bucket_numel: int,
                 timer: PhaseTimer) -> None:
        self.key = self.key_of(param_groups)
        self.adapters: dict[int, ShardingAdapter] = {}
        self.slot_lists: dict[int, list[Slot]] = {}
        self.engine_index: dict[tuple[int, int], int] = {}
        self.group: dist.ProcessGroup | None = None
        self.device: torch.device | None = None
        layouts, first = [], None
        for group in param_groups:
            for i, p in enumerate(group["params"]):
                adapter = adapter_for(p)
                self.adapters[id(p)] = adapter
                self.slot_lists[id(p)] = adapter.slots(p)
                pg = adapter.process_group(p)
                if pg is None:
                    continue
                device = adapter.local(p).device
                if first is None:
                    first, self.group, self.device = name_of(group, i), pg, device
                    check_group_serves(pg, device, first)
                elif pg is not self.group:
                    raise ValueError(f"MARSM needs every sharded parameter on one process group; "
                                     f"{name_of(group, i)} and {first} are sharded over different ones")
                elif device != self.device:
                    raise ValueError(f"MARSM needs every sharded parameter on one device; "
                                     f"{name_of(group, i)} is on {device} and {first} on {self.device}")
                for k, slot in enumerate(self.slot_lists[id(p)]):
                    if slot.layout is not None and uses_marsm(group, slot):
                        self.engine_index[(id(p), k)] = len(layouts)
                        layouts.append(slot.layout)
        self.engine = (ShardingEngine(layouts, self.group, owner_policy, bucket_numel, timer,
                                      self.device)
                       if layouts else None)

    @staticmethod
    def key_of(param_groups: list[Group]) -> tuple:
        return tuple((id(p), g["use_marsm"]) for g in param_groups for p in g["params"])

    def adapter(self, p: Tensor) -> ShardingAdapter:
        return self.adapters[id(p)]

    def slots(self, p: Tensor) -> list[Slot]:
        return self.slot_lists[id(p)]

    def is_sharded_matrix(self, p: Tensor, k: int = 0) -> bool:
        return (id(p), k) in self.engine_index

    def all_reduce(self, vec: Tensor) -> Tensor:
        """Sum ``vec`` over the ranks holding shards (a no-op for a world of one)."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return vec
        out = vec.to(self.device)
        dist.all_reduce(out, group=self.group)
        return out.to(vec.device)
