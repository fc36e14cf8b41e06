"""Topology decisions, in one place: which group a step's statistics and plan span (the job group),
the device its collectives use (the shards' device, or the device CPU shards are staged to under
a group that serves only CUDA: :mod:`marsm_dist.sharding.offload`), how a matrix held over a
sub-group is described over the job group (widening), and which ranks hold copies of the same
pieces (replica groups).

Pure functions of the process groups and layouts they are given; nothing is kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .adapter import ShardingAdapter, Slot, check_group_serves
from .exchange import ReplicaGroup
from .layout import MatrixLayout
from .subgroups import GroupRequest

__all__ = ["exchange_device", "job_group", "over_job_group", "replica_groups", "same_ranks"]


def same_ranks(a: dist.ProcessGroup, b: dist.ProcessGroup) -> bool:
    """True if the two groups hold the same ranks in the same order."""
    return a is b or dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)


def job_group(held: list[tuple[str, dist.ProcessGroup, torch.device, dist.ProcessGroup | None]]
               ) -> tuple[dist.ProcessGroup | None, torch.device | None]:
    """The widest group any parameter is held over, and the shards' device: statistics are summed
    over it. Every other group must lie inside it (e.g. FSDP2's data-parallel sub-mesh beside a
    2-D mesh). A group that serves neither the shards' device nor a device to stage CPU shards
    to is refused here (:func:`check_group_serves`)."""
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


def exchange_device(group: dist.ProcessGroup | None, device: torch.device | None) -> torch.device | None:
    """Where ``group``'s collectives take their tensors for shards on ``device``: ``device``, or for
    CPU shards under a group that serves only CUDA (NCCL), the current CUDA device."""
    if group is None or device is None:
        return device
    return check_group_serves(group, device, "a sharded parameter")


def over_job_group(adapter: ShardingAdapter, p: Tensor, slot: Slot, pg: dist.ProcessGroup | None,
                   job: dist.ProcessGroup | None, name: str) -> tuple[Any, Any]:
    """A matrix's layout and replica group over the job group itself (its owner is one rank of
    the whole job): as the adapter gave it, or widened by the adapter from a sub-group."""
    if pg is None or job is None or same_ranks(pg, job):
        return slot.layout, adapter.replica_group(p)
    widened = adapter.widen(p, job) if slot.numel < 0 else None
    if widened is not None:
        return widened
    raise NotImplementedError(
        f"MARSM: the matrix {name} is held over ranks {dist.get_process_group_ranks(pg)}, but other "
        f"parameters span ranks {dist.get_process_group_ranks(job)}; orthogonalizing it once "
        f"in the job needs all matrices on one mesh (e.g. apply the same parallelize/fully_shard "
        f"mesh to every module whose weights take the MARS-M update)")


def replica_groups(matrices: list[Any], shared: list[int], group: dist.ProcessGroup | None
                   ) -> dict[tuple[int, ...], ReplicaGroup]:
    """The replica group of every replica pattern among the ``shared`` matrices (each with a
    ``layout``, ``replica_group`` and ``name``), checked for every matrix against its layout."""
    out: dict[tuple[int, ...], ReplicaGroup] = {}
    job = dist.get_process_group_ranks(group) if group is not None else [0]
    me = dist.get_rank(group) if group is not None else 0
    position = {g: r for r, g in enumerate(job)}
    members: dict[tuple[int, ...], list[int]] = {}
    for i in shared:
        m = matrices[i]
        if m.layout.num_replicas <= 1:
            continue
        # Every matrix is checked, not only the first of its replica pattern: matrices with the
        # same pattern share one group, so each must hold its pieces as that group's members do.
        rg = _replica_group(m.layout, m.replica_group, job, me, m.name, position)
        ranks = _members(m.replica_group, job[me])
        if m.layout.replicas not in out:
            out[m.layout.replicas], members[m.layout.replicas] = rg, ranks
        elif sorted(ranks) != sorted(members[m.layout.replicas]):
            raise ValueError(f"MARSM: {m.name} has the copies of other matrices (replica pattern "
                             f"{m.layout.replicas}) but another replica group ({ranks}, not "
                             f"{members[m.layout.replicas]}); matrices with one pattern must share one")
    return out


def _replica_group(layout: MatrixLayout, pg: dist.ProcessGroup | GroupRequest | None, job_ranks: list[int],
                   me: int, name: str, position: dict[int, int] | None = None) -> ReplicaGroup:
    if pg is None:
        raise ValueError(f"MARSM: {name} has {layout.num_replicas} copies but no replica group")
    members = _members(pg, job_ranks[me])
    position = position if position is not None else {g: r for r, g in enumerate(job_ranks)}
    source: dict[int, int] = {}
    for k, g in enumerate(members):
        if g not in position:
            raise ValueError(f"MARSM: the replica group of {name} holds rank {g}, outside the job group")
        r = position[g]
        if layout.pieces[r] != layout.pieces[me] or layout.replica_of(r) in source:
            raise ValueError(f"MARSM: the replica group of {name} does not match its layout: its members "
                             f"must hold the same pieces, one member per copy")
        source[layout.replica_of(r)] = k
    if sorted(source) != sorted(set(layout.replicas or (0,))):
        raise ValueError(f"MARSM: the replica group of {name} has members of copies {sorted(source)}; "
                         f"its layout has copies {sorted(set(layout.replicas or (0,)))}")
    return ReplicaGroup(pg, source)


def _members(pg: dist.ProcessGroup | GroupRequest, me: int) -> list[int]:
    return list(pg.set_of(me) or ()) if isinstance(pg, GroupRequest) else dist.get_process_group_ranks(pg)
