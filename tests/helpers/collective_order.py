"""Record every collective a rank issues, and check the ranks' records against NCCL's rules.

NCCL (unlike gloo, which often copes) needs, for a job not to hang:

1. the members of each process group issue the same collectives on it, in the same order, with
   matching sizes (an all-to-all's split sizes pair up: what rank i sends to j is what j expects
   from i);
2. ranks that share two groups issue their operations on those groups in the same interleaving
   (operations on different communicators must be ordered the same way on every rank);
3. sub-groups are created by the ranks of their parent in the same order (a creation is an event
   on the group that must take part in it).

:class:`CollectiveLog` patches ``torch.distributed``'s collectives (and group creation) while it
is active and appends one :class:`Event` per call, in issue order; :func:`check_collective_order`
takes every rank's log and raises ``AssertionError`` naming the first violation. Point-to-point
sends and receives (pipeline schedules) are not recorded: they pair by peer, not by group.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CollectiveLog", "Event", "check_collective_order"]

# op name -> the arguments that must agree on every member (besides the tensor sizes)
_COLLECTIVES = {
    "all_reduce": ("op",), "reduce": ("op", "dst", "group_dst"), "broadcast": ("src", "group_src"),
    "all_to_all_single": (), "all_to_all": (), "gather": ("dst", "group_dst"),
    "scatter": ("src", "group_src"), "all_gather": (), "all_gather_into_tensor": (),
    "reduce_scatter": ("op",), "reduce_scatter_tensor": ("op",), "barrier": (), "monitored_barrier": (),
    "all_gather_object": (), "broadcast_object_list": ("src", "group_src"), "gather_object": ("dst",),
    "scatter_object_list": ("src",), "all_gather_single": (), "reduce_scatter_single": ("op",),
}
_CREATION = ("new_group", "split_group", "destroy_process_group")


@dataclass(frozen=True)
class Event:
    """One call: the group it ran on (name and global ranks), the op, and what must agree.

    ``sig`` is what every member must pass alike (element counts, dtype, root, reduce op);
    ``splits`` are an all-to-all's (input, output) split sizes, which must pair up instead."""

    group: str
    ranks: tuple[int, ...]
    op: str
    sig: tuple
    splits: tuple | None = None

    def __str__(self) -> str:
        extra = f" splits={self.splits}" if self.splits is not None else ""
        return f"{self.op} on group {self.group} {list(self.ranks)} {self.sig}{extra}"


def _group_of(group: Any) -> tuple[str, tuple[int, ...]]:
    pg = group if group is not None and group is not dist.group.WORLD else c10d._get_default_group()
    return pg.group_name, tuple(dist.get_process_group_ranks(pg))


def _describe(value: Any) -> Any:
    """What must agree about one argument: a tensor's element count and dtype, a list's items."""
    if isinstance(value, torch.Tensor):
        return (value.numel(), str(value.dtype))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value if isinstance(v, torch.Tensor)) or len(value)
    return repr(value)


class CollectiveLog:
    """While active, record each ``torch.distributed`` collective this process issues.

    Only the outermost call is recorded (a collective built from others counts once); calls from
    other threads are not (an async checkpoint writer runs its own)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0
        self._thread = threading.get_ident()

    def __enter__(self) -> CollectiveLog:
        for name in (*_COLLECTIVES, *_CREATION):
            original = getattr(c10d, name, None)
            if original is None:
                continue
            wrapped = self._wrap(name, original)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self._saved.append((module, name, original))
                    setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            outer = self._depth == 0 and threading.get_ident() == self._thread
            if outer:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                before = self._event(name, bound.arguments) if name != "new_group" else None
                if before is not None:
                    self.events.append(before)
            self._depth += 1
            try:
                out = original(*args, **kwargs)
            finally:
                self._depth -= 1
            if outer and name == "new_group":
                self.events.append(self._created(bound.arguments, out))
            return out

        return recorded

    @staticmethod
    def _event(name: str, a: dict[str, Any]) -> Event | None:
        if name == "split_group":
            group, ranks = _group_of(a["parent_pg"])
            return Event(group, ranks, name, (repr(sorted(sorted(s) for s in a["split_ranks"])),))
        if name == "destroy_process_group":
            if a["group"] is None:  # the whole job ends: not an event of one group
                return None
            group, ranks = _group_of(a["group"])
            return Event(group, ranks, name, ())
        group, ranks = _group_of(a.get("group"))
        if name == "all_to_all_single":
            world = len(ranks)
            out_s = a["output_split_sizes"] or [a["output"].numel() // world] * world
            in_s = a["input_split_sizes"] or [a["input"].numel() // world] * world
            return Event(group, ranks, name, (str(a["input"].dtype),), (tuple(in_s), tuple(out_s)))
        tensors = [v for k, v in a.items() if k not in _COLLECTIVES[name] and k != "group"
                   and isinstance(v, (torch.Tensor, list, tuple)) and name not in ("gather", "scatter")]
        if name in ("gather", "scatter"):  # the list lives on the root only: compare the tensor
            tensors = [a["tensor"]]
        if name.endswith("_object") or name.endswith("_object_list"):
            tensors = []
        sig = tuple(_describe(t) for t in tensors) + tuple(repr(a.get(k)) for k in _COLLECTIVES[name])
        return Event(group, ranks, name, sig)

    @staticmethod
    def _created(a: dict[str, Any], out: Any) -> Event:
        """A ``new_group`` is an event of the ranks that must call it: the whole job (the default),
        or only the new group's members (``use_local_synchronization``)."""
        ranks = tuple(sorted(a["ranks"])) if a["ranks"] is not None else None
        if a.get("use_local_synchronization"):
            if out is None or out is dist.GroupMember.NON_GROUP_MEMBER:
                return Event("<non-member>", (), "new_group(local)", (ranks,))
            group, members = _group_of(out)
            return Event(group, members, "new_group(local)", (ranks,))
        group, members = _group_of(None)
        return Event(group, members, "new_group", (ranks,))


def check_collective_order(logs: dict[int, list[Event]]) -> None:
    """Raise ``AssertionError`` unless the logs (global rank -> its events) obey NCCL's rules (see
    the module docstring). Every member of a group that appears must have a log."""
    per_group: dict[str, dict[int, list[Event]]] = {}
    members: dict[str, tuple[int, ...]] = {}
    for rank, events in logs.items():
        for e in events:
            if e.group == "<non-member>":
                continue
            if members.setdefault(e.group, e.ranks) != e.ranks:
                raise AssertionError(f"group {e.group} has ranks {members[e.group]} on one rank and "
                                     f"{e.ranks} on rank {rank}")
            per_group.setdefault(e.group, {}).setdefault(rank, []).append(e)
    for group, ranks in members.items():
        _check_group(group, ranks, {r: per_group[group].get(r, []) for r in ranks}, logs)
    ranks = sorted(logs)
    for i, r in enumerate(ranks):
        for s in ranks[i + 1:]:
            order_r = [e.group for e in logs[r] if s in e.ranks and r in e.ranks]
            order_s = [e.group for e in logs[s] if r in e.ranks and s in e.ranks]
            if order_r != order_s:
                k = next(k for k, (a, b) in enumerate(zip(order_r, order_s, strict=False)) if a != b)
                raise AssertionError(
                    f"ranks {r} and {s} interleave their shared groups differently: their operation "
                    f"#{k} on shared groups is on group {order_r[k]} on rank {r}, on group {order_s[k]} "
                    f"on rank {s} (NCCL needs the same order on every rank)")


def _check_group(group: str, ranks: tuple[int, ...], seqs: dict[int, list[Event]],
                 logs: dict[int, list[Event]]) -> None:
    missing = [r for r in ranks if r not in logs]
    if missing:
        raise AssertionError(f"group {group} {list(ranks)}: ranks {missing} have no log")
    lengths = {r: len(s) for r, s in seqs.items()}
    first = ranks[0]
    for k in range(max(lengths.values())):
        have = {r: s[k] for r, s in seqs.items() if k < len(s)}
        if len(have) < len(ranks):
            absent = [r for r in ranks if r not in have]
            raise AssertionError(f"group {group} {list(ranks)}: ranks {sorted(have)} issue a #{k} "
                                 f"operation ({next(iter(have.values()))}), ranks {absent} do not")
        ops = {(e.op, e.sig) for e in have.values()}
        if len(ops) > 1:
            raise AssertionError(f"group {group} {list(ranks)}: operation #{k} differs between ranks: "
                                 + "; ".join(f"rank {r}: {e}" for r, e in have.items()))
        if have[first].splits is not None:
            for i, r in enumerate(ranks):
                for j, s in enumerate(ranks):
                    sent, expected = have[r].splits[0][j], have[s].splits[1][i]
                    if sent != expected:
                        raise AssertionError(
                            f"group {group}: all_to_all #{k}: rank {r} sends {sent} elements to rank "
                            f"{s}, which expects {expected}")
