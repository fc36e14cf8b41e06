"""What one step works on, collected before anything is written.

:class:`StepMap` is the per-step map of a set of param groups: each parameter's adapter and slots,
and the distributor that knows where each matrix's Newton-Schulz runs (built on the first step
that steps these groups, then kept). :meth:`StepMap.collect` turns the groups into a
:class:`StepWork`: every group's matrix and AdamW entries as local views (the shard this rank
holds), which the guards (``_step_guards``) and the phases (``_step_phases``) then walk.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from ._timing import PhaseTimer
from .ns_coefficients import coefficient_schedule
from .options import BY_NAME
from .orthogonalize import NSConfig
from .sharding.adapter import ShardingAdapter, Slot, adapter_for, slot_view
from .sharding.agreement import on_device
from .sharding.distributor import Distributor, MatrixSpec
from .sharding.experts import expert_slots
from .sharding.layout import replicated
from .sharding.topology import job_group, over_job_group

__all__ = ["GroupWork", "StepMap", "StepWork", "check_grad", "param_name", "routes_to_marsm"]

Group = dict[str, Any]


@dataclass(eq=False)
class GroupWork:
    """The slots of one group (and one branch) that take part in this step.

    A slot is one logical tensor inside a parameter container (see ``sharding.Slot``); entry
    ``j`` is slot ``slots[j]`` of container ``params[j]``. ``grads`` are local views, with zeros
    standing in for a sharded matrix that has no gradient on this rank (it still joins every
    collective); ``has_grad`` says which those are.
    """

    group: Group
    param_groups: list[Group]  # all of them: names by position need the group's index
    params: list[Tensor] = field(default_factory=list)
    adapters: list[ShardingAdapter] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    indices: list[tuple[int, int]] = field(default_factory=list)  # (param index in group, slot)
    local_params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    has_grad: list[bool] = field(default_factory=list)

    def add(self, p: Tensor, adapter: ShardingAdapter, slot: Slot, index: tuple[int, int]) -> None:
        self.params.append(p)
        self.adapters.append(adapter)
        self.slots.append(slot)
        self.indices.append(index)
        local = slot_view(adapter.local(p), slot)
        self.local_params.append(local)
        self.has_grad.append(p.grad is not None)
        grad = slot_view(adapter.local(p.grad), slot) if p.grad is not None else torch.zeros_like(local)
        self.grads.append(grad)

    def local_state(self, state: Mapping, key: str) -> list[Tensor]:
        return [slot_view(a.local(state[p][key]), s)
                for p, a, s in zip(self.params, self.adapters, self.slots, strict=True)]

    def name(self, j: int) -> str:
        """Entry ``j``'s name, for messages."""
        return param_name(self.param_groups, self.group, self.indices[j], self.slots[j])

    def containers(self) -> list[Tensor]:
        """The distinct parameter containers, in first-seen order."""
        return list({id(p): p for p in self.params}.values())

    def signed_grads(self, js: list[int]) -> list[Tensor]:
        """Local gradients of entries ``js``, negated for ``maximize`` (a copy of these only)."""
        gs = [self.grads[j] for j in js]
        return list(torch._foreach_neg(gs)) if self.group["maximize"] else gs

    def variance_reduced(self, prev: list[Tensor], js: list[int], scratch: F.Scratch | None = None,
                         after: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """The signed gradients of entries ``js`` and their c_t = g + kappa (g - P), new tensors of
        these only, or (on the CPU) views of ``scratch`` (``after``: see ``Scratch.views``). Both
        places that need c_t call this, so they compute it alike."""
        gs = self.signed_grads(js)
        momentum, gamma = self.group["momentum"], self.group["gamma"]
        if on_device(momentum) or on_device(gamma):
            kappa = gamma * momentum / (1.0 - momentum)  # stays on the device: no read before the step's
        else:
            kappa = F.marsm_kappa(float(momentum), float(gamma))
        out = scratch.views(gs, after=after) if scratch is not None else None
        return gs, F.variance_reduced_grads(gs, [prev[j] for j in js], kappa=kappa, out=out)

    def ns_config(self) -> NSConfig:
        """The group's Newton-Schulz settings ("ns_form" checked again: a group edited after it was
        added is refused here, before anything is written)."""
        g = self.group
        form = g.get("ns_form", "auto")
        BY_NAME["ns_form"].check(form, "", True)
        schedule = coefficient_schedule(g["ns_coefficients"])  # hashable, however it was written
        return NSConfig(g["ns_steps"], g["ns_dtype"], schedule, g["flatten"], form)


@dataclass(eq=False)
class StepWork:
    """Everything one step works on: its map, the matrix and AdamW work per group, and the bound on
    elementwise temporaries (``chunk_numel`` elements)."""

    step_map: StepMap
    matrix: list[GroupWork]
    adamw: list[GroupWork]
    chunk_numel: int

    def containers(self) -> list[Tensor]:
        """Every parameter container this step steps."""
        return [p for work in self.matrix + self.adamw for p in work.containers()]


def param_name(param_groups: list[Group], group: Group, i: int | tuple[int, int],
               slot: Slot | None = None) -> str:
    """A parameter's (or slot's) name: the adapter's, the optimizer's names, or its position."""
    i, k = i if isinstance(i, tuple) else (i, 0)
    if slot is not None and slot.name is not None:
        return repr(slot.name)
    names = group.get("param_names")
    if names is not None:
        base = repr(names[i])
    else:
        gi = next(n for n, g in enumerate(param_groups) if g is group)
        base = f"param_groups[{gi}]['params'][{i}]"
    return base if slot is None or slot.numel < 0 else f"{base} slot {k}"


def check_grad(param_groups: list[Group], group: Group, i: int, grad: Tensor) -> None:
    """Refuse gradient kinds MARS-M cannot take, naming the parameter."""
    kind = "sparse" if grad.is_sparse else "complex" if torch.is_complex(grad) else None
    if kind is not None:
        raise RuntimeError(f"MARSM does not support {kind} gradients ({param_name(param_groups, group, i)})")


def routes_to_marsm(group: Group, slot: Slot) -> bool:
    """True if ``slot`` takes the matrix update in ``group`` (its ``use_marsm``, else >= 2 dims;
    in an ``experts`` group, >= 2 dims per expert: a per-expert bias ``(E, n)`` goes to AdamW)."""
    return F.takes_marsm(group["use_marsm"], slot.shape, bool(group.get("experts")) and slot.expert is None)


def _refuse_misrouted(param_groups: list[Group], group: Group, i: int, slot: Slot) -> None:
    name = param_name(param_groups, group, i)
    if group.get("experts") and slot.expert is None and len(slot.shape) >= 2:
        raise RuntimeError(
            f"{name} has shape {slot.shape} and sits in a use_marsm=True, experts=True group: dim 0 "
            f"counts experts, so each expert is {len(slot.shape) - 1}-D, not a matrix. Put it in a "
            "group without experts=True, or route it to AdamW.")
    if len(slot.shape) < 2:
        raise RuntimeError(
            f"{name} has shape {slot.shape} but sits in a use_marsm=True group. If a framework "
            "flattened it (DeepSpeed ZeRO), import marsm_dist.adapters.deepspeed before "
            "deepspeed.initialize.")


class StepMap:
    """Adapters, slots and the distributor for a set of param groups: the per-step map.

    ``process_group``: the group plain (unsharded) parameters are replicated over (DDP); their
    matrices then get one owner in that group instead of running Newton-Schulz on every rank.
    """

    def __init__(self, param_groups: list[Group], *, process_group: dist.ProcessGroup | None,
                 owner_policy: str, bucket_numel: int, timer: PhaseTimer, overlap: bool = True,
                 max_team: int = 1, pin_memory: bool | None = None) -> None:
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
        held = []  # (name, group, device, root) of every parameter held over a group
        for group in param_groups:
            for i, p in enumerate(group["params"]):
                adapter = self.adapters[id(p)] = adapter_for(p)
                self.slot_lists[id(p)] = adapter.slots(p)
                pg = groups[id(p)] = adapter.process_group(p)
                if pg is not None or replicate:
                    held.append((param_name(param_groups, group, i), pg or process_group,
                                 adapter.local(p).device, adapter.root_group(p) if pg is not None else None))
        self.group, self.device = job_group(held)
        specs: list[MatrixSpec] = []
        for group in param_groups:
            for i, p in enumerate(group["params"]):
                slots = self._matrices(param_groups, group, i, p, groups[id(p)],
                                       process_group if replicate else None, specs)
                self.slot_lists[id(p)] = slots
        self.scratch = F.Scratch()  # kept memory for the elementwise temporaries (CPU)
        self.distributor = Distributor(specs, self.group, self.device, policy=owner_policy,
                                       bucket_numel=bucket_numel, timer=timer, overlap=overlap,
                                       max_team=max_team, pin_memory=pin_memory)

    def _matrices(self, param_groups: list[Group], group: Group, i: int, p: Tensor, pg: Any,
                  replicas: Any, specs: list[MatrixSpec]) -> list[Slot]:
        """``p``'s slots, each matrix among them given its layout over the job group (split per
        expert in an ``experts`` group) and appended to ``specs``. ``replicas``: the group plain
        parameters are replicated over, if more than one rank."""
        adapter, name = self.adapters[id(p)], param_name(param_groups, group, i)
        slots: list[Slot] = []
        for slot in self.slot_lists[id(p)]:
            if not routes_to_marsm(group, slot):
                slots.append(slot)
                continue
            if slot.layout is not None:
                layout, copies = over_job_group(adapter, p, slot, pg, self.group, name)
            elif replicas is not None and pg is None:
                layout, copies = replicated(slot.shape, dist.get_world_size(replicas)), replicas
            else:
                layout, copies = None, None
            if group.get("experts") and len(slot.shape) >= 3:
                names = group.get("param_names")
                raw = slot.name or (names[i] if names is not None else None)
                rank = dist.get_rank(self.group) if self.group is not None else 0
                parts = expert_slots(slot, layout, rank, raw)
            else:
                parts = [(slot, layout, name)]
            for part, part_layout, part_name in parts:
                self.matrix_index[(id(p), len(slots))] = len(specs)
                slots.append(part)
                specs.append(MatrixSpec(part.shape, part_layout, copies if part_layout else None, part_name))
        return slots

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

    def is_shared_matrix(self, p: Tensor, k: int = 0) -> bool:
        """True if slot ``k`` of ``p`` is a matrix held over the job group (every rank joins its
        collectives, with or without a gradient)."""
        i = self.matrix_index.get((id(p), k))
        return i is not None and self.distributor.is_shared(i)

    def collect(self, param_groups: list[Group], chunk_numel: int) -> StepWork:
        """Split every container's slots into matrix and AdamW work, one of each per group. A slot
        takes part when its container has a gradient, or when it is a sharded matrix (every rank
        must join the same collectives, whether or not its shard got a gradient)."""
        matrix, adamw = [], []
        for group in param_groups:
            mw, aw = GroupWork(group, param_groups), GroupWork(group, param_groups)
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    check_grad(param_groups, group, i, p.grad)
                for k, slot in enumerate(self.slot_lists[id(p)]):
                    if 0 in slot.shape:  # nothing to update (and no matrix to orthogonalize)
                        continue
                    is_matrix = routes_to_marsm(group, slot)
                    if is_matrix and (len(slot.shape) < 2 or (group.get("experts") and slot.expert is None)):
                        _refuse_misrouted(param_groups, group, i, slot)
                    if p.grad is None and not (is_matrix and self.is_shared_matrix(p, k)):
                        continue
                    (mw if is_matrix else aw).add(p, self.adapters[id(p)], slot, (i, k))
            matrix.append(mw)
            adamw.append(aw)
        return StepWork(self, [w for w in matrix if w.params], [w for w in adamw if w.params], chunk_numel)

    def stale_part(self, matrix: list[GroupWork]) -> str | None:
        """A sharded matrix whose local part no longer has the size its plan was made for (a
        parameter resized in place after the optimizer planned), described; None if none."""
        distributor = self.distributor
        for work in matrix:
            for p, (_, k), local, slot in zip(work.params, work.indices, work.local_params, work.slots,
                                              strict=True):
                layout = distributor.matrices[self.matrix_index[(id(p), k)]].layout
                planned = layout.local_numel(distributor.rank) if layout is not None else local.numel()
                if local.numel() != planned:
                    name = "" if slot.name is None else f" {slot.name!r}"
                    return (f"MARSM: this rank's part of a {layout.shape} matrix{name} has {local.numel()} "
                            f"elements; the optimizer planned for {planned} (was the parameter replaced or "
                            f"resized after the optimizer was built?)")
        return None
