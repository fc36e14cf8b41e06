"""Sub-groups of a job group, made the way NCCL needs them.

The step needs process groups of its own: a team's ranks (``teams``), and the replica group of a
weight replicated on several mesh dims (HSDP x TP). NCCL's rules for making them:

- A group is made by every rank of its *parent*, in the same order: ``new_group`` over the whole
  job is a collective of every rank (non-members join an eagerly initialized NCCL communicator's
  split with no colour), and ``split_group`` is one of the parent's.
- ``new_group(..., use_local_synchronization=True)`` called by members only looks local, but
  torch names such a group from its ranks *and the number of groups this rank has registered*:
  members and non-members drift apart, and a later group among a mix of them gets different
  names on different ranks, so its rendezvous never meets (reproduced: two plans with teams
  (0, 1), then (0, 1, 2, 3), hang at W=4 on gloo). With ``init_process_group(device_id=...)`` it
  also splits the default communicator, which needs every rank: members hang.

So a :class:`GroupRequest` names a *partition* of (some of) the parent's ranks, every rank of the
parent opens it at the same point of its program (after the plan has been checked the same on
every rank), all of its groups are made in one pass, and the handle is shared by every plan that
asks for the same partition and destroyed when the last one closes it. How a partition is made:

- a parent that spans the job (the default group's ranks): ``new_group(ranks)`` for each set,
  by every rank, named from the job-wide count of groups;
- a smaller parent, the default group bound to a device (eager NCCL): one
  ``split_group(parent, sets)``, a split of the parent's communicator;
- a smaller parent, lazily initialized: each rank makes its own set's group (a rank in no set
  makes a group of itself, so every rank registers one group and the counts stay in step),
  after a check over the parent that every set's members will give it the same name.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["GroupRequest", "OpenGroups", "open_groups"]


@dataclass(frozen=True, eq=False)
class GroupRequest:
    """Groups to make over ``parent``: ``sets`` are disjoint sets of global ranks (each sorted), in
    an order every rank of ``parent`` shares. A rank outside every set gets no group."""

    parent: dist.ProcessGroup
    sets: tuple[tuple[int, ...], ...]

    @property
    def key(self) -> tuple:
        return (self.parent.group_name, self.sets)

    def set_of(self, rank: int) -> tuple[int, ...] | None:
        """The set global rank ``rank`` belongs to (None: none)."""
        return next((s for s in self.sets if rank in s), None)


class OpenGroups:
    """The groups of one request, shared by every plan that opened it (see :func:`open_groups`)."""

    def __init__(self, request: GroupRequest, groups: dict[tuple[int, ...], dist.ProcessGroup],
                 keep: bool = False) -> None:
        self.request, self.groups, self.users, self.keep = request, groups, 0, keep
        self.job = c10d._get_default_group()  # the job they belong to (a new one makes them stale)

    def group_of(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        """The group of the set ``ranks`` (this rank must belong to it)."""
        return self.groups[ranks]

    def close(self) -> None:
        """One user is done; the last one destroys the groups. Every rank of the parent closes at
        the same point of its program, as it opened."""
        self.users -= 1
        if self.users > 0:
            return
        if _OPEN.get(self.request.key) is self:
            del _OPEN[self.request.key]
        if self.keep:
            # A group made by its members only is named from its ranks and the rank's count of
            # groups: destroyed and made again, it gets the same name, and its rendezvous can read
            # the old group's (closed) addresses from the store. Seen under load: "Connection
            # refused" between the two stages of tests/test_collective_order.py. Kept for reuse.
            _KEPT[self.request.key] = self
            return
        if self.job is c10d._get_default_group():  # (otherwise the job, and its groups, ended)
            for group in self.groups.values():
                dist.destroy_process_group(group)
        self.groups = {}


_OPEN: dict[tuple, OpenGroups] = {}
_KEPT: dict[tuple, OpenGroups] = {}  # closed groups made by their members only, for reuse


def open_groups(request: GroupRequest, device: torch.device) -> OpenGroups:
    """Make (or share) the groups of ``request``. Every rank of ``request.parent`` calls this, in the
    same order. ``device``: where the parent's collectives take their tensors."""
    shared = _OPEN.get(request.key) or _KEPT.pop(request.key, None)
    if shared is not None and shared.job is not c10d._get_default_group():
        del _OPEN[request.key]  # made in a job that has ended (its groups are gone with it)
        shared = None
    if shared is None:
        shared = OpenGroups(request, *_make(request, device))
    _OPEN[request.key] = shared
    shared.users += 1
    return shared


def _make(request: GroupRequest, device: torch.device
          ) -> tuple[dict[tuple[int, ...], dist.ProcessGroup], bool]:
    """The request's groups (this rank's), and whether they were made by their members only."""
    parent, sets = request.parent, request.sets
    me = dist.get_rank()
    groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    if dist.get_world_size(parent) == dist.get_world_size():
        for s in sets:  # a collective of the whole job: every rank makes every group
            g = dist.new_group(list(s))
            if me in s:
                groups[s] = g
        return groups, False
    default = c10d._get_default_group()
    if getattr(default, "bound_device_id", None) is not None and torch.accelerator.is_available():
        parent_ranks = dist.get_process_group_ranks(parent)
        g = dist.split_group(parent, split_ranks=[[parent_ranks.index(r) for r in s] for s in sets])
        mine = request.set_of(me)
        if mine is not None and g is not None:
            groups[mine] = g
        return groups, False
    mine = request.set_of(me) or (me,)  # a singleton keeps this rank's count of groups in step
    _check_names_agree(parent, mine, device)
    g = dist.new_group(list(mine), use_local_synchronization=True)
    if request.set_of(me) is not None:
        groups[mine] = g
    return groups, True


def _check_names_agree(parent: dist.ProcessGroup, mine: tuple[int, ...], device: torch.device) -> None:
    """Refuse, instead of hanging, where the members of a set would give its group different names
    (their counts of registered groups differ: groups made outside MARSM by some ranks only)."""
    name_of = getattr(c10d, "_hash_ranks_to_str", None)
    if name_of is None:  # torch names groups another way: nothing to predict
        return
    name = name_of(list(mine))
    digest = int.from_bytes(hashlib.sha256(f"{mine}:{name}".encode()).digest()[:7], "little")
    size = dist.get_world_size(parent)
    mine_t = torch.tensor([digest], dtype=torch.int64, device=device)
    everyone = torch.empty(size, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, mine_t, group=parent)
    if device.type == "meta":  # no values to compare
        return
    ranks = dist.get_process_group_ranks(parent)
    values = everyone.tolist()
    if any(values[ranks.index(r)] != digest for r in mine):
        raise RuntimeError(
            f"MARSM: the ranks {list(mine)} would give their new process group different names (torch "
            "names a locally made group by how many groups each rank holds, and these ranks hold "
            "different numbers), and would hang making it. Initialize the process group with "
            "device_id=... (groups are then split from it); for teams, ns_team_max=1 needs no group")
