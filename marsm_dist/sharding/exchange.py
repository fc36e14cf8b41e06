"""Gather matrix shards to their owners and scatter results back: every collective lives here.

Within the owner's copy of a matrix (see ``layout.MatrixLayout.replicas``): one
``all_to_all_single`` per direction per bucket, with per-rank split sizes. That is the one gloo
collective that takes uneven sizes (its list forms of all_gather/all_to_all/gather reject them,
and non-root ranks then hang until the timeout). A round whose matrices need no data from other
ranks (replicated data parallel: the owner holds the whole matrix) makes no call at all.

To the other copies (replicas): each rank of the owner's copy broadcasts its pieces of the
results over its replica group, one broadcast per copy per round. The owner never sends one
buffer per replica, so its memory and bytes out do not grow with the number of replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.profiler import record_function

from .layout import MatrixLayout, assemble, cut

__all__ = ["Exchange", "ExchangeCounters", "ReplicaGroup"]


@dataclass
class ExchangeCounters:
    """Bytes this rank sent to and received from *other* ranks, and collective calls made.

    A broadcast counts its bytes once per receiving rank on the sender's side."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0


@dataclass
class ReplicaGroup:
    """This rank's replica group for one replica pattern: the ranks that hold the same pieces as
    this rank, one per copy. ``source[c]`` is the group rank of the member in copy ``c``."""

    group: dist.ProcessGroup
    source: dict[int, int] = field(default_factory=dict)


def _moves_data(layout: MatrixLayout, owner: int) -> bool:
    """True if the owner's copy of the matrix has pieces on ranks other than the owner."""
    return any(layout.local_numel(r) for r in layout.copy_ranks(owner) if r != owner)


class Exchange:
    """The gather-to-owner and scatter-back collectives over one process group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.counters = ExchangeCounters()

    def _all_to_all(self, send: Tensor, in_splits: list[int], out_splits: list[int]) -> Tensor:
        out = send.new_empty(sum(out_splits))
        itemsize = send.element_size()
        me = self.rank
        self.counters.bytes_sent += itemsize * (sum(in_splits) - in_splits[me])
        self.counters.bytes_received += itemsize * (sum(out_splits) - out_splits[me])
        if self.world_size == 1:
            out.copy_(send)
            return out
        self.counters.calls += 1
        dist.all_to_all_single(out, send, out_splits, in_splits, group=self.group)
        return out

    def _in_copy(self, layout: MatrixLayout, owner: int, rank: int) -> int:
        """Elements ``rank`` exchanges with ``owner`` for this matrix (0 outside its copy)."""
        return layout.local_numel(rank) if layout.replica_of(rank) == layout.replica_of(owner) else 0

    def gather(
        self, items: list[tuple[MatrixLayout, int, Tensor]], dtype: torch.dtype
    ) -> list[Tensor | None]:
        """Each item is (layout, owner, this rank's flat local data). Returns, for the items this
        rank owns, the full tensor in ``dtype`` assembled from its copy (``None`` for the others)."""
        me, world = self.rank, self.world_size
        for layout, _, flat in items:
            if flat.numel() != layout.local_numel(me):
                raise RuntimeError(f"local shard of a {layout.shape} matrix has {flat.numel()} "
                                   f"elements on rank {me}, its layout says {layout.local_numel(me)}")
        mine = [k for k, (_, o, _) in enumerate(items) if o == me]
        if not any(_moves_data(lay, o) for lay, o, _ in items):  # every owner holds its matrices
            return [items[k][2].to(dtype).view(items[k][0].shape) if k in mine else None
                    for k in range(len(items))]
        in_splits = [sum(self._in_copy(lay, d, me) for lay, o, _ in items if o == d) for d in range(world)]
        out_splits = [sum(self._in_copy(items[k][0], me, s) for k in mine) for s in range(world)]
        send = torch.empty(sum(in_splits), dtype=dtype, device=items[0][2].device)
        offset = 0
        for d in range(world):
            for lay, o, flat in items:
                if o == d and self._in_copy(lay, d, me):
                    send[offset:offset + flat.numel()].copy_(flat.reshape(-1))
                    offset += flat.numel()
        with record_function("marsm::gather"):
            recv = self._all_to_all(send, in_splits, out_splits)
        parts: dict[int, dict[int, Tensor]] = {k: {} for k in mine}
        offset = 0
        for s in range(world):
            for k in mine:
                n = self._in_copy(items[k][0], me, s)
                if n:
                    parts[k][s] = recv[offset:offset + n]
                    offset += n
        fulls: list[Tensor | None] = [None] * len(items)
        for k in mine:  # (no parts: a matrix with no elements)
            fulls[k] = (assemble(items[k][0], parts[k], dtype) if parts[k] else
                        torch.empty(items[k][0].shape, dtype=dtype, device=items[0][2].device))
        return fulls

    def scatter(
        self, items: list[tuple[MatrixLayout, int]], fulls: list[Tensor | None], dtype: torch.dtype,
        device: torch.device,
    ) -> list[Tensor | None]:
        """The reverse of :meth:`gather`: owners cut their full results into the pieces of their
        copy's ranks. Returns this rank's flat local data of every item owned in its copy
        (``None`` for items owned in another copy: :meth:`spread` brings those)."""
        me, world = self.rank, self.world_size
        mine = [k for k, (_, o) in enumerate(items) if o == me]
        local: list[Tensor | None] = [None] * len(items)
        if not any(_moves_data(lay, o) for lay, o in items):
            for k in mine:
                local[k] = fulls[k].reshape(-1)
            return local
        cuts = {k: cut(items[k][0], fulls[k], items[k][0].copy_ranks(me)) for k in mine}
        in_splits = [sum(cuts[k][d].numel() for k in mine if d in cuts[k]) for d in range(world)]
        out_splits = [sum(self._in_copy(lay, s, me) for lay, o in items if o == s) for s in range(world)]
        send = torch.empty(sum(in_splits), dtype=dtype, device=device)
        offset = 0
        for d in range(world):
            for k in mine:
                piece = cuts[k].get(d)
                if piece is not None and piece.numel():
                    send[offset:offset + piece.numel()].copy_(piece)
                    offset += piece.numel()
        with record_function("marsm::scatter"):
            recv = self._all_to_all(send, in_splits, out_splits)
        offset = 0
        for s in range(world):
            for k, (lay, o) in enumerate(items):
                if o == s and lay.replica_of(s) == lay.replica_of(me):
                    n = lay.local_numel(me)
                    local[k] = recv[offset:offset + n]
                    offset += n
        return local

    def spread(self, items: list[tuple[MatrixLayout, int, ReplicaGroup | None]],
               local: list[Tensor | None], dtype: torch.dtype, device: torch.device
               ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(k, this rank's flat pieces)`` for the items owned in another copy: per copy, its
        ranks broadcast their pieces (``local``) over their replica groups. One broadcast's buffer
        at a time: a caller that applies and drops each result never holds every copy's at once."""
        me = self.rank
        patterns: dict[tuple[int, ...], list[int]] = {}
        for k, (lay, _, _) in enumerate(items):
            if lay.num_replicas > 1:
                patterns.setdefault(lay.replicas, []).append(k)
        for ks in patterns.values():
            replica_group = items[ks[0]][2]
            lay0 = items[ks[0]][0]
            for copy in sorted(set(lay0.replicas)):
                owned = [k for k in ks if items[k][0].replica_of(items[k][1]) == copy]
                sizes = [items[k][0].local_numel(me) for k in owned]
                if not sum(sizes):  # so for every member of this replica group: same pieces
                    continue
                sender = lay0.replica_of(me) == copy
                buf = (torch.cat([local[k].reshape(-1) for k in owned]) if sender else
                       torch.empty(sum(sizes), dtype=dtype, device=device))
                self._broadcast(buf, replica_group, copy, lay0.num_replicas, sender)
                if not sender:
                    offset = 0
                    for k, n in zip(owned, sizes, strict=True):
                        yield k, buf[offset:offset + n]
                        offset += n
                del buf

    def _broadcast(self, buf: Tensor, rg: ReplicaGroup | None, copy: int, copies: int, sender: bool) -> None:
        itemsize = buf.element_size()
        if sender:
            self.counters.bytes_sent += itemsize * buf.numel() * (copies - 1)
        else:
            self.counters.bytes_received += itemsize * buf.numel()
        if rg is None:
            raise RuntimeError("MARSM: a replicated matrix has no replica group to receive its result over")
        self.counters.calls += 1
        with record_function("marsm::spread"):
            dist.broadcast(buf, group=rg.group, group_src=rg.source[copy])

