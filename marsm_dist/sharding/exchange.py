"""Gather matrix shards to their owners and scatter results back: every collective lives here.

Within the owner's copy of a matrix (see ``layout.MatrixLayout.replicas``): one
``all_to_all_single`` per direction per bucket, with per-rank split sizes. That is the one gloo
collective that takes uneven sizes (its list forms of all_gather/all_to_all/gather reject them,
and non-root ranks then hang until the timeout). A round whose matrices need no data from other
ranks (replicated data parallel: the owner holds the whole matrix) makes no call at all.

To the other copies (replicas): each rank of the owner's copy broadcasts its pieces of the
results over its replica group, one broadcast per copy per round, started ahead within a window
of buffer memory so they can run while the next round is orthogonalized. The owner never sends one
buffer per replica, so its memory and bytes out do not grow with the number of replicas.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.profiler import record_function

from .layout import MatrixLayout, assemble, cut
from .subgroups import GroupRequest

__all__ = ["Exchange", "ExchangeCounters", "Pending", "ReplicaGroup", "Spreading"]


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
    this rank, one per copy. ``source[c]`` is the group rank of the member in copy ``c``. ``group``
    may be a request for groups not made yet; the engine makes them after its plan check."""

    group: dist.ProcessGroup | GroupRequest
    source: dict[int, int] = field(default_factory=dict)


def _moves_data(layout: MatrixLayout, owner: int) -> bool:
    """True if the owner's copy of the matrix has pieces on ranks other than the owner."""
    return any(layout.local_numel(r) for r in layout.copy_ranks(owner) if r != owner)


class Pending:
    """A started exchange: ``wait()`` waits for its collective (if any) and returns the result.
    It holds the send buffer until then (NCCL reads it on its own stream)."""

    def __init__(self, work: dist.Work | None, finish: Callable[[], list[Tensor | None]],
                 keep: Tensor | None = None) -> None:
        self._work, self._finish, self._keep = work, finish, keep

    def wait(self) -> list[Tensor | None]:
        if self._work is not None:
            self._work.wait()
        self._keep = None
        return self._finish()


class Exchange:
    """The gather-to-owner and scatter-back collectives over one process group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.counters = ExchangeCounters()

    def _all_to_all(self, send: Tensor, in_splits: list[int], out_splits: list[int]
                    ) -> tuple[Tensor, dist.Work | None]:
        """Start the exchange; returns the receive buffer and the work to wait on before reading
        it (``None``: already there). The send buffer must live until then."""
        out = send.new_empty(sum(out_splits))
        itemsize = send.element_size()
        me = self.rank
        self.counters.bytes_sent += itemsize * (sum(in_splits) - in_splits[me])
        self.counters.bytes_received += itemsize * (sum(out_splits) - out_splits[me])
        if self.world_size == 1:
            out.copy_(send)
            return out, None
        self.counters.calls += 1
        work = dist.all_to_all_single(out, send, out_splits, in_splits, group=self.group, async_op=True)
        return out, work

    def _in_copy(self, layout: MatrixLayout, owner: int, rank: int) -> int:
        """Elements ``rank`` exchanges with ``owner`` for this matrix (0 outside its copy)."""
        return layout.local_numel(rank) if layout.replica_of(rank) == layout.replica_of(owner) else 0

    def start_gather(self, items: list[tuple[MatrixLayout, int, Tensor]], dtype: torch.dtype
                     ) -> Pending:
        """Start gathering matrices to their owners. Each item is (layout, owner, this rank's flat
        local data). The collective runs while the caller does other work; the returned handle's
        ``wait()`` gives, for the items this rank owns, the full tensor in ``dtype`` assembled from
        its copy (``None`` for the others)."""
        me, world = self.rank, self.world_size
        for layout, _, flat in items:
            if flat.numel() != layout.local_numel(me):
                raise RuntimeError(f"local shard of a {layout.shape} matrix has {flat.numel()} "
                                   f"elements on rank {me}, its layout says {layout.local_numel(me)}")
        mine = [k for k, (_, o, _) in enumerate(items) if o == me]
        if not any(_moves_data(lay, o) for lay, o, _ in items):  # every owner holds its matrices
            return Pending(None, lambda: [items[k][2].to(dtype).view(items[k][0].shape) if k in mine
                                          else None for k in range(len(items))])
        in_splits = [sum(self._in_copy(lay, d, me) for lay, o, _ in items if o == d) for d in range(world)]
        out_splits = [sum(self._in_copy(items[k][0], me, s) for k in mine) for s in range(world)]
        device = items[0][2].device
        send = torch.empty(sum(in_splits), dtype=dtype, device=device)
        offset = 0
        for d in range(world):
            for lay, o, flat in items:
                if o == d and self._in_copy(lay, d, me):
                    send[offset:offset + flat.numel()].copy_(flat.reshape(-1))
                    offset += flat.numel()
        with record_function("marsm::gather"):
            recv, work = self._all_to_all(send, in_splits, out_splits)

        def assemble_owned() -> list[Tensor | None]:
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
                            torch.empty(items[k][0].shape, dtype=dtype, device=device))
            return fulls

        return Pending(work, assemble_owned, keep=send)

    def start_scatter(
        self, items: list[tuple[MatrixLayout, int]], fulls: list[Tensor | None], dtype: torch.dtype,
        device: torch.device,
    ) -> Pending:
        """Start the reverse of :meth:`start_gather`: owners cut their full results into the pieces
        of their copy's ranks. ``wait()`` gives this rank's flat local data of every item owned in
        its copy (``None`` for items owned in another copy: :meth:`spread` brings those). The
        owners' results are copied into the send buffer here, so the caller may drop ``fulls`` at
        once."""
        me, world = self.rank, self.world_size
        mine = [k for k, (_, o) in enumerate(items) if o == me]
        local: list[Tensor | None] = [None] * len(items)
        if not any(_moves_data(lay, o) for lay, o in items):
            for k in mine:
                local[k] = fulls[k].reshape(-1)
            for k, (lay, o) in enumerate(items):  # ranks of the owner's copy that hold none of it
                if o != me and lay.replica_of(o) == lay.replica_of(me):
                    local[k] = torch.empty(0, dtype=dtype, device=device)
            return Pending(None, lambda: local)
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
        del cuts
        with record_function("marsm::scatter"):
            recv, work = self._all_to_all(send, in_splits, out_splits)

        def split_received() -> list[Tensor | None]:
            offset = 0
            for s in range(world):
                for k, (lay, o) in enumerate(items):
                    if o == s and lay.replica_of(s) == lay.replica_of(me):
                        n = lay.local_numel(me)
                        local[k] = recv[offset:offset + n]
                        offset += n
            return local

        return Pending(work, split_received, keep=send)

    def spread(self, items: list[tuple[MatrixLayout, int, ReplicaGroup | None]],
               local: list[Tensor | None], dtype: torch.dtype, device: torch.device, window: int = 0
               ) -> Spreading:
        """Start sending the items owned in another copy to this rank's copy: per copy, its ranks
        broadcast their pieces (``local``) over their replica groups. Iterating the result yields
        ``(k, this rank's flat pieces)`` as each broadcast lands. Broadcasts are started ahead while
        their buffers total at most ``window`` elements (always one): a caller that applies and
        drops each result holds about ``window`` elements, not every copy's results at once.

        Every rank walks the same list of the round's broadcasts (each replica group's, in one
        order) and counts each at the same size, the most any rank holds of it, so every rank
        posts each broadcast at the same point: a rank takes part in those of its own replica
        groups and skips the others. A window counted from this rank's own pieces posted a
        broadcast before a job-group collective on one member of its group and after it on another
        (their pieces of *other* patterns differ), which NCCL, which needs one order of operations
        across communicators, answers with a hang."""
        me = self.rank
        patterns: dict[tuple[int, ...], list[int]] = {}
        for k, (lay, _, _) in enumerate(items):
            if lay.num_replicas > 1:
                patterns.setdefault(lay.replicas, []).append(k)
        sends = []
        for ks in patterns.values():
            lay0 = items[ks[0]][0]
            for copy in sorted(set(lay0.replicas)):
                owned = [k for k in ks if items[k][0].replica_of(items[k][1]) == copy]
                schedule = sum(items[k][0].max_local_numel for k in owned)  # the same on every rank
                if schedule:
                    sizes = [items[k][0].local_numel(me) for k in owned]
                    sends.append(_Broadcast(owned, sizes, schedule, items[ks[0]][2], copy, lay0.num_replicas,
                                            lay0.replica_of(me) == copy))
        return Spreading(self, sends, local, dtype, device, window)

    def _broadcast(self, buf: Tensor, rg: ReplicaGroup | None, copy: int, copies: int, sender: bool
                   ) -> dist.Work:
        itemsize = buf.element_size()
        if sender:
            self.counters.bytes_sent += itemsize * buf.numel() * (copies - 1)
        else:
            self.counters.bytes_received += itemsize * buf.numel()
        if rg is None:
            raise RuntimeError("MARSM: a replicated matrix has no replica group to receive its result over")
        self.counters.calls += 1
        with record_function("marsm::spread"):
            return dist.broadcast(buf, group=rg.group, group_src=rg.source[copy], async_op=True)


@dataclass
class _Broadcast:
    """One broadcast of a round: the items copy ``copy`` owns, this rank's pieces of them, and the
    size every rank counts it at (``schedule``: the most any rank holds of them)."""

    owned: list[int]
    sizes: list[int]
    schedule: int
    replica_group: ReplicaGroup | None
    copy: int
    copies: int
    sender: bool

    @property
    def takes_part(self) -> bool:
        """True if this rank holds pieces of these items (so do the rest of its replica group)."""
        return sum(self.sizes) > 0


class Spreading:
    """A round's broadcasts to the other copies, started ahead within a window (see
    :meth:`Exchange.spread`); iterate it for the pieces this rank receives."""

    def __init__(self, exchange: Exchange, sends: list[_Broadcast], local: list[Tensor | None],
                 dtype: torch.dtype, device: torch.device, window: int) -> None:
        self._exchange, self._sends, self._local = exchange, sends, local
        self._dtype, self._device, self._window = dtype, device, window
        self._next = 0
        self._posted: deque[tuple[_Broadcast, Tensor | None, dist.Work | None]] = deque()
        self._held = 0
        self._post_ahead()

    def _post_ahead(self) -> None:
        # Decided from ``schedule`` sizes only, which every rank shares (see Exchange.spread).
        while self._next < len(self._sends):
            b = self._sends[self._next]
            if self._posted and self._held + b.schedule > self._window:
                return
            buf = work = None
            if b.takes_part:
                buf = (torch.cat([self._local[k].reshape(-1) for k in b.owned]) if b.sender else
                       torch.empty(sum(b.sizes), dtype=self._dtype, device=self._device))
                work = self._exchange._broadcast(buf, b.replica_group, b.copy, b.copies, b.sender)
            self._posted.append((b, buf, work))
            self._held += b.schedule
            self._next += 1

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        while self._posted:
            b, buf, work = self._posted.popleft()
            if work is not None:
                work.wait()
            self._held -= b.schedule
            self._post_ahead()
            if buf is not None and not b.sender:
                offset = 0
                for k, n in zip(b.owned, b.sizes, strict=True):
                    yield k, buf[offset:offset + n]
                    offset += n
            del buf
