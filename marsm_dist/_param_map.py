"""What the optimizer knows about its parameters for one set of param groups: each parameter's
adapter and slots, which slots are matrices, and the distributor that orthogonalizes them.

Built on the first step (and again if the param groups change), so frameworks that swap
parameters after the optimizer is constructed (ZeRO) are seen as they are when training starts.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._step_inputs import param_name, routes_to_marsm
from ._timing import PhaseTimer
from .sharding.adapter import ShardingAdapter, Slot, adapter_for, check_group_serves
from .sharding.distributor import Distributor, MatrixSpec
from .sharding.experts import per_expert
from .sharding.layout import MatrixLayout, replicated

Group = dict[str, Any]


def _same_ranks(a: dist.ProcessGroup, b: dist.ProcessGroup) -> bool:
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


class ParamMap:
    """Adapters, slots and the distributor for the current param groups.

    ``process_group``: the group plain (unsharded) parameters are replicated over (DDP); their
    matrices then get one owner in that group instead of running Newton-Schulz on every rank.
    """

    def __init__(self, param_groups: list[Group], *, process_group: dist.ProcessGroup | None,
                 owner_policy: str, bucket_numel: int, timer: PhaseTimer, overlap: bool = True,
                 max_team: int = 1) -> None:
        self.key = self.key_of(param_groups)
        self.param_ids = frozenset(k[0] for k in self.key)  # which parameters a step here steps
        # Weak references: a cache hit must be for these very tensors, not new ones that reuse a
        # freed id (a replaced or resized parameter), which would get another tensor's plan.
        self._refs = [weakref.ref(p) for g in param_groups for p in g["params"]]
        self.adapters: dict[int, ShardingAdapter] = {}
        self.slot_lists: dict[int, list[Slot]] = {}
        self.matrix_index: dict[tuple[int, int], int] = {}
        replicate = process_group is not None and dist.get_world_size(process_group) > 1
        groups: dict[int, dist.ProcessGroup | None] = {}  # the adapter's group of each parameter
        held = []  # (name, group, device) of every parameter held over a group
        for group in param_groups:
            for i, p in enumerate(group["params"]):
                adapter = self.adapters[id(p)] = adapter_for(p)
                self.slot_lists[id(p)] = adapter.slots(p)
                pg = groups[id(p)] = adapter.process_group(p)
                if pg is not None or replicate:
                    held.append((param_name(param_groups, group, i), pg or process_group,
                                 adapter.local(p).device, adapter.root_group(p) if pg is not None else None))
        self.group, self.device = self._job_group(held)
        specs: list[MatrixSpec] = []
        for group in param_groups:
            for i, p in enumerate(group["params"]):
                adapter, name, pg = self.adapters[id(p)], param_name(param_groups, group, i), groups[id(p)]
                slots: list[Slot] = []
                for slot in self.slot_lists[id(p)]:
                    if not routes_to_marsm(group, slot):
                        slots.append(slot)
                        continue
                    if slot.layout is not None:
                        layout, copies = self._over_job_group(adapter, p, slot, pg, name)
                    elif replicate and pg is None:
                        layout = replicated(slot.shape, dist.get_world_size(process_group))
                        copies = process_group
                    else:
                        layout, copies = None, None
                    if group.get("experts") and len(slot.shape) >= 3:
                        parts = self._per_expert(slot, layout, group, i)
                    else:
                        parts = [(slot, layout, name)]
                    for part, part_layout, part_name in parts:
                        self.matrix_index[(id(p), len(slots))] = len(specs)
                        slots.append(part)
                        specs.append(MatrixSpec(part.shape, part_layout, copies if part_layout else None,
                                                part_name))
                self.slot_lists[id(p)] = slots
        self.distributor = Distributor(specs, self.group, self.device, policy=owner_policy,
                                       bucket_numel=bucket_numel, timer=timer, overlap=overlap,
                                       max_team=max_team)

    def _per_expert(self, slot: Slot, layout: MatrixLayout | None, group: Group, i: int
                    ) -> list[tuple[Slot, MatrixLayout | None, str]]:
        """``slot`` (dim 0: experts) as one slot per expert: its own shape, layout and place in the
        container's local data, so the rest of the step treats each expert as a matrix of its own."""
        names = group.get("param_names")
        raw = slot.name or (names[i] if names is not None else None)
        base = slot.offset if slot.numel >= 0 else 0
        shape = tuple(slot.shape[1:])
        n = math.prod(shape)
        if layout is None:
            cuts = [(None, base + e * n, n) for e in range(slot.shape[0])]
        else:
            rank = dist.get_rank(self.group) if self.group is not None else 0
            cuts = [(lay, base + starts[rank], lay.local_numel(rank)) for lay, starts in per_expert(layout)]
        out = []
        for e, (lay, offset, numel) in enumerate(cuts):
            label = f"{raw}[{e}]" if raw is not None else None
            part = Slot(shape, lay, offset, numel, label, e)
            out.append((part, lay, repr(label) if label else f"expert {e} of slot of {shape}"))
        return out

    @staticmethod
    def _job_group(held: list[tuple[str, dist.ProcessGroup, torch.device, dist.ProcessGroup | None]]
                   ) -> tuple[dist.ProcessGroup | None, torch.device | None]:
        """The widest group any parameter is held over: statistics are summed over it. Every other
        group must lie inside it (e.g. FSDP2's data-parallel sub-mesh beside a 2-D mesh)."""
        if not held:
            return None, None
        name, job, device, _ = max(held, key=lambda h: dist.get_world_size(h[1]))
        ranks = set(dist.get_process_group_ranks(job))
        if any(not set(dist.get_process_group_ranks(h[1])) <= ranks for h in held):
            # Groups that cross (experts on the ep dim, dense weights on the dp dim of one mesh):
            # the job is the widest group the parameters' layouts can be described over (their
            # root mesh), and each parameter is described over it (the adapters widen them).
            roots = [h[3] for h in held if h[3] is not None]
            if roots:
                root = max(roots, key=dist.get_world_size)
                job, ranks = root, set(dist.get_process_group_ranks(root))
        check_group_serves(job, device, name)
        for other, pg, dev, _ in held:
            if dev != device:
                raise ValueError(f"MARSM needs every sharded parameter on one device; {other} is on {dev} "
                                 f"and {name} on {device}")
            if not set(dist.get_process_group_ranks(pg)) <= ranks:
                raise ValueError(
                    f"MARSM needs every sharded or replicated parameter inside one group of ranks; {other} "
                    f"is held over ranks {dist.get_process_group_ranks(pg)}, outside {sorted(ranks)} of "
                    f"{name}, and together they do not span the world (one MARSM per pipeline stage "
                    f"must see only its stage's parameters)")
        return job, device

    def _over_job_group(self, adapter: ShardingAdapter, p: Tensor, slot: Slot, pg: dist.ProcessGroup | None,
                        name: str) -> tuple[Any, dist.ProcessGroup | None]:
        """A matrix's layout and replica group over the job group itself (its owner is one rank of
        the whole job): as the adapter gave it, or widened by the adapter from a sub-group."""
        if pg is None or self.group is None or _same_ranks(pg, self.group):
            return slot.layout, adapter.replica_group(p)
        widened = adapter.widen(p, self.group) if slot.numel < 0 else None
        if widened is not None:
            return widened
        raise NotImplementedError(
            f"MARSM: the matrix {name} is held over ranks {dist.get_process_group_ranks(pg)}, but other "
            f"parameters span ranks {dist.get_process_group_ranks(self.group)}; orthogonalizing it once "
            f"in the job needs all matrices on one mesh (e.g. apply the same parallelize/fully_shard "
            f"mesh to every module whose weights take the MARS-M update)")

    def close(self) -> None:
        """Release the process groups this map's plan made (see ``Distributor.close``)."""
        self.distributor.close()

    @staticmethod
    def key_of(param_groups: list[Group]) -> tuple:
        return tuple((id(p), g["use_marsm"], bool(g.get("experts")))
                     for g in param_groups for p in g["params"])

    def serves(self, param_groups: list[Group]) -> bool:
        """True if the groups hold the very tensors this map was built for."""
        params = [p for g in param_groups for p in g["params"]]
        return len(params) == len(self._refs) and all(
            r() is p for r, p in zip(self._refs, params, strict=True))

    def adapter(self, p: Tensor) -> ShardingAdapter:
        return self.adapters[id(p)]

    def slots(self, p: Tensor) -> list[Slot]:
        return self.slot_lists[id(p)]

    def is_shared_matrix(self, p: Tensor, k: int = 0) -> bool:
        """True if slot ``k`` of ``p`` is a matrix held over the job group (every rank joins its
        collectives, with or without a gradient)."""
        i = self.matrix_index.get((id(p), k))
        return i is not None and self.distributor.is_shared(i)
