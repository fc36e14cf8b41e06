"""Gather matrix shards to their owners and scatter results back: every collective lives here.

One ``all_to_all_single`` per direction per bucket, with per-rank split sizes. That is the one
gloo collective that takes uneven sizes (its list forms of all_gather/all_to_all/gather reject
them, and non-root ranks then hang until the timeout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.profiler import record_function

from .layout import MatrixLayout, assemble, cut

__all__ = ["Exchange", "ExchangeCounters"]


@dataclass
class ExchangeCounters:
    """Bytes this rank sent to and received from *other* ranks, and collective calls made."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0


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

    def gather(
        self, items: list[tuple[MatrixLayout, int, Tensor]], dtype: torch.dtype
    ) -> list[Tensor | None]:
        """Each item is (layout, owner, this rank's flat local data). Returns, for the items this
        rank owns, the full tensor in ``dtype`` (``None`` for the others)."""
        me, world = self.rank, self.world_size
        for layout, _, flat in items:
            if flat.numel() != layout.local_numel(me):
                raise RuntimeError(f"local shard of a {layout.shape} matrix has {flat.numel()} "
                                   f"elements on rank {me}, its layout says {layout.local_numel(me)}")
        in_splits = [sum(f.numel() for _, o, f in items if o == d) for d in range(world)]
        mine = [k for k, (_, o, _) in enumerate(items) if o == me]
        out_splits = [sum(items[k][0].local_numel(s) for k in mine) for s in range(world)]
        send = torch.empty(sum(in_splits), dtype=dtype, device=items[0][2].device)
        offset = 0
        for d in range(world):
            for _, o, flat in items:
                if o == d:
                    send[offset:offset + flat.numel()].copy_(flat.reshape(-1))
                    offset += flat.numel()
        with record_function("marsm::gather"):
            recv = self._all_to_all(send, in_splits, out_splits)
        parts: dict[int, dict[int, Tensor]] = {k: {} for k in mine}
        offset = 0
        for s in range(world):
            for k in mine:
                n = items[k][0].local_numel(s)
                parts[k][s] = recv[offset:offset + n]
                offset += n
        fulls: list[Tensor | None] = [None] * len(items)
        for k in mine:
            fulls[k] = assemble(items[k][0], parts[k], dtype)
        return fulls

    def scatter(
        self, items: list[tuple[MatrixLayout, int]], fulls: list[Tensor | None], dtype: torch.dtype,
        device: torch.device,
    ) -> list[Tensor]:
        """The reverse of :meth:`gather`: owners cut their full results into every rank's pieces;
        returns this rank's flat local data of every item."""
        me, world = self.rank, self.world_size
        mine = [k for k, (_, o) in enumerate(items) if o == me]
        cuts = {k: cut(items[k][0], fulls[k]) for k in mine}
        in_splits = [sum(cuts[k][d].numel() for k in mine) for d in range(world)]
        out_splits = [sum(lay.local_numel(me) for lay, o in items if o == s) for s in range(world)]
        send = torch.empty(sum(in_splits), dtype=dtype, device=device)
        offset = 0
        for d in range(world):
            for k in mine:
                piece = cuts[k][d]
                send[offset:offset + piece.numel()].copy_(piece)
                offset += piece.numel()
        with record_function("marsm::scatter"):
            recv = self._all_to_all(send, in_splits, out_splits)
        local: list[Tensor] = [recv[:0]] * len(items)
        offset = 0
        for s in range(world):
            for k, (lay, o) in enumerate(items):
                if o == s:
                    n = lay.local_numel(me)
                    local[k] = recv[offset:offset + n]
                    offset += n
        return local
