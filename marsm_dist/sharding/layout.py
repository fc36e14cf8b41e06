"""Where each rank's local tensor sits inside a full logical tensor: the piece layout.

A full tensor of logical shape ``shape`` is cut into tensor-parallel blocks along ``split_dim``
(one block when there is no tensor parallelism; equal blocks unless ``block_sizes`` says
otherwise). A *piece* is a flat range ``[start, stop)`` of one block's row-major flattening. A
rank's local tensor, flattened, is the concatenation of its pieces in order. This one
description covers a single process (one piece, everything), FSDP2 ``Shard(0)`` (one run of
whole rows), ZeRO flat partitions (any range, may start mid-row), Megatron TP splits (a block,
or a range inside one) and 2-D DTensors (rows of a column block, uneven blocks included).

Replicas: ``replicas[r]`` is the copy rank ``r`` belongs to. Ranks of one copy hold every
element exactly once between them; ranks of different copies that hold the same pieces hold the
same values (data-parallel replicas: DDP, HSDP's replicate dimension, Megatron's DP ranks).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MatrixLayout", "Piece", "Runs", "assemble", "cut", "flat_overlap", "from_runs",
           "replicated", "row_chunks", "whole"]


@dataclass(frozen=True)
class Piece:
    """A flat range ``[start, stop)`` of tensor-parallel block ``block``."""

    block: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class MatrixLayout:
    """The pieces every rank of a process group holds of one full tensor.

    Attributes:
        shape: the full logical shape.
        pieces: ``pieces[r]`` is what group rank ``r`` holds, in its local storage order.
        split_dim: the dim the tensor-parallel blocks are cut along.
        num_blocks: the number of tensor-parallel blocks (1: no tensor parallelism).
        replicas: ``replicas[r]``: the copy rank ``r`` belongs to (None: one copy, all ranks).
        block_sizes: the blocks' sizes along ``split_dim`` when they differ (None: equal).
    """

    shape: tuple[int, ...]
    pieces: tuple[tuple[Piece, ...], ...]
    split_dim: int = 0
    num_blocks: int = 1
    replicas: tuple[int, ...] | None = None
    block_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.block_sizes is None and self.shape[self.split_dim] % self.num_blocks:
            raise ValueError(f"dim {self.split_dim} of {self.shape} does not split into "
                             f"{self.num_blocks} blocks")
        if self.block_sizes is not None and (len(self.block_sizes) != self.num_blocks
                                             or sum(self.block_sizes) != self.shape[self.split_dim]):
            raise ValueError(f"block sizes {self.block_sizes} do not cut dim {self.split_dim} "
                             f"of {self.shape}")
        if self.replicas is not None and len(self.replicas) != len(self.pieces):
            raise ValueError(f"{len(self.replicas)} replica indices for {len(self.pieces)} ranks")
        for copy in sorted(set(self.replicas or (0,))):
            self._check_covers([r for r in range(len(self.pieces)) if self.replica_of(r) == copy])

    def _check_covers(self, ranks: list[int]) -> None:
        covered = sorted((p.block, p.start, p.stop) for r in ranks for p in self.pieces[r] if p.numel)
        position: dict[int, int] = {}
        for block, start, stop in covered:
            if not (0 <= block < self.num_blocks and 0 <= start < stop <= self.block_numel_of(block)):
                raise ValueError(f"piece {(block, start, stop)} is outside {self.shape}")
            if start != position.get(block, 0):
                raise ValueError(f"pieces of {self.shape} overlap or leave a gap at block {block}")
            position[block] = stop
        if any(position.get(b, 0) != self.block_numel_of(b) for b in range(self.num_blocks)):
            raise ValueError(f"pieces of {self.shape} do not cover every element exactly once")

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Every block's size along ``split_dim``."""
        if self.block_sizes is not None:
            return self.block_sizes
        return (self.shape[self.split_dim] // self.num_blocks,) * self.num_blocks

    def block_shape_of(self, block: int) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.split_dim] = self.sizes[block]
        return tuple(s)

    def block_numel_of(self, block: int) -> int:
        return math.prod(self.block_shape_of(block))

    @property
    def num_replicas(self) -> int:
        return 1 if self.replicas is None else len(set(self.replicas))

    def replica_of(self, rank: int) -> int:
        return 0 if self.replicas is None else self.replicas[rank]

    def copy_ranks(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s copy: between them they hold every element once."""
        mine = self.replica_of(rank)
        return [r for r in range(self.world_size) if self.replica_of(r) == mine]

    def local_numel(self, rank: int) -> int:
        return sum(p.numel for p in self.pieces[rank])

    @functools.cached_property
    def max_local_numel(self) -> int:
        """The most elements any one rank holds: the same number on every rank (a decision every
        rank must take alike, such as when to post a collective, may use it; its own
        ``local_numel`` differs between ranks)."""
        return max((self.local_numel(r) for r in range(self.world_size)), default=0)

    @functools.cached_property
    def preferred_owners(self) -> tuple[int, ...] | None:
        """The ranks an owner should be among, for locality (None: any rank).

        Ranks that hold the whole tensor (an expert on its expert-parallel rank, and its copies)
        cost nothing to gather to; otherwise, when the tensor lives on a few ranks only (at most
        half: an expert's own FSDP group, a small matrix inside one or two ZeRO partitions), the
        gather stays among them. A tensor spread over most ranks (FSDP rows, replicated copies
        on every rank) may go anywhere: the plan balances it.
        """
        world = self.world_size
        whole_holders = tuple(r for r in range(world) if self.local_numel(r) == self.numel)
        if whole_holders:
            return whole_holders if len(whole_holders) < world else None
        holders = tuple(r for r in range(world) if self.local_numel(r))
        return holders if 0 < 2 * len(holders) <= world else None


def flat_overlap(span: tuple[int, int], window: tuple[int, int]) -> tuple[int, int] | None:
    """The part of flat range ``window`` that lies in flat range ``span``, counted from ``span``'s start.

    None when they do not meet. The one rule behind every "which part of this is that rank's"
    question of flat buffers: a parameter against a rank's partition (ZeRO, Megatron's bucket
    shards), a rank's range against a tensor-parallel block or a checkpoint target.
    """
    a, b = max(span[0], window[0]), min(span[1], window[1])
    return (a - span[0], b - span[0]) if b > a else None


def whole(shape: tuple[int, ...], world_size: int = 1, holder: int = 0) -> MatrixLayout:
    """One rank (``holder``) holds the whole tensor; the others hold nothing."""
    n = math.prod(shape)
    pieces = tuple((Piece(0, 0, n),) if r == holder else () for r in range(world_size))
    return MatrixLayout(tuple(shape), pieces)


def replicated(shape: tuple[int, ...], world_size: int) -> MatrixLayout:
    """Every rank holds all of the tensor, as its own copy (replicated data parallel)."""
    n = math.prod(shape)
    return MatrixLayout(tuple(shape), ((Piece(0, 0, n),),) * world_size, replicas=tuple(range(world_size)))


def row_chunks(shape: tuple[int, ...], world_size: int) -> MatrixLayout:
    """Rows split over ranks as ``torch.chunk`` does (FSDP2 ``Shard(0)``): ceil(rows / W) rows
    per rank, so trailing ranks may hold fewer rows or none (e.g. 3 rows over 4 ranks: 1,1,1,0)."""
    rows, row_numel = shape[0], math.prod(shape[1:])
    chunk = -(-rows // world_size)
    pieces = []
    for r in range(world_size):
        r0, r1 = min(r * chunk, rows), min((r + 1) * chunk, rows)
        pieces.append((Piece(0, r0 * row_numel, r1 * row_numel),) if r1 > r0 else ())
    return MatrixLayout(tuple(shape), tuple(pieces))


Runs = tuple[tuple[int, int], ...]  # ranges [a, b) of indices along one dim, in local order


def _merged(pieces: list[Piece]) -> tuple[Piece, ...]:
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1].block == p.block and out[-1].stop == p.start:
            out[-1] = Piece(p.block, out[-1].start, p.stop)
        elif p.numel:
            out.append(p)
    return tuple(out)


def from_runs(shape: tuple[int, ...], runs: Sequence[Sequence[Runs]],
              replicas: Sequence[int] | None = None) -> MatrixLayout:
    """The layout of ranks whose local tensors are ``full[I_0 x I_1 x ...]``.

    ``runs[r][d]`` is the index set rank ``r`` holds along dim ``d``, as runs in local order
    (what a DTensor's placements select). When rows and at most one other dim are split, and each
    rank holds one run of that dim, the runs become tensor-parallel blocks (uneven ones too) and
    a rank holds row ranges of one block. Otherwise every run of the last dim is a piece (correct
    for any placement, but many pieces when columns are cut into many runs).
    """
    shape = tuple(shape)
    held = [r for r in runs if all(r)]  # ranks that hold something
    split = [d for d in range(1, len(shape)) if any(tuple(r[d]) != ((0, shape[d]),) for r in held)]
    if not split:  # rows only: each run of rows is one flat range
        inner = math.prod(shape[1:])
        pieces = tuple(_merged([Piece(0, a * inner, b * inner) for a, b in r[0]]) if all(r) else ()
                       for r in runs)
        return MatrixLayout(shape, pieces, replicas=_copies(replicas))
    if len(split) == 1 and all(len(r[split[0]]) == 1 for r in held):
        d = split[0]
        starts = sorted({r[d][0][0] for r in held})
        ends = starts[1:] + [shape[d]]
        # Blocks when the ranks' column runs tile the dim: each run is one whole block.
        if starts[:1] == [0] and all(r[d][0] == (r[d][0][0], ends[starts.index(r[d][0][0])]) for r in held):
            sizes = [b - a for a, b in zip(starts, ends, strict=True)]
            inner = [math.prod(shape[1:]) // shape[d] * n for n in sizes]
            pieces = []
            for r in runs:
                if not all(r):
                    pieces.append(())
                    continue
                b = starts.index(r[d][0][0])
                pieces.append(_merged([Piece(b, a * inner[b], z * inner[b]) for a, z in r[0]]))
            return MatrixLayout(shape, tuple(pieces), d, len(sizes), _copies(replicas), tuple(sizes))
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    pieces = []
    for r in runs:
        flat: list[Piece] = []
        if all(r):
            for outer in _product([[i for a, b in rd for i in range(a, b)] for rd in r[:-1]]):
                base = sum(i * st for i, st in zip(outer, strides, strict=False))
                flat += [Piece(0, base + a, base + z) for a, z in r[-1]]
        pieces.append(_merged(flat))
    return MatrixLayout(shape, tuple(pieces), replicas=_copies(replicas))


def _product(sets: Sequence[Sequence[int]]):
    if not sets:
        yield ()
        return
    for i in sets[0]:
        for rest in _product(sets[1:]):
            yield (i, *rest)


def _copies(replicas: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if replicas is None or len(set(replicas)) <= 1 else tuple(replicas)


def _blocks_of(layout: MatrixLayout, full: Tensor) -> list[Tensor]:
    """The full tensor's blocks, each flattened (copies only when a block is not contiguous)."""
    if layout.num_blocks == 1:
        return [full.reshape(-1)]
    return [b.reshape(-1) for b in full.split(list(layout.sizes), dim=layout.split_dim)]


def assemble(layout: MatrixLayout, parts: dict[int, Tensor], dtype: torch.dtype) -> Tensor:
    """Rebuild the full tensor from the flat local data of the ranks of one copy (``parts[rank]``)."""
    device = next(iter(parts.values())).device
    if layout.num_blocks == 1:
        blocks = [torch.empty(layout.numel, dtype=dtype, device=device)]
    else:
        blocks = [torch.empty(layout.block_numel_of(b), dtype=dtype, device=device)
                  for b in range(layout.num_blocks)]
    for rank, flat in parts.items():
        offset = 0
        for piece in layout.pieces[rank]:
            blocks[piece.block][piece.start:piece.stop] = flat[offset:offset + piece.numel]
            offset += piece.numel
    if layout.num_blocks == 1:
        return blocks[0].view(layout.shape)
    return torch.cat([b.view(layout.block_shape_of(k)) for k, b in enumerate(blocks)], dim=layout.split_dim)


def cut(layout: MatrixLayout, full: Tensor, ranks: Sequence[int] | None = None) -> dict[int, Tensor]:
    """The flat local data of ``full`` (its pieces, concatenated) for ``ranks`` (default: all)."""
    blocks = _blocks_of(layout, full)
    out = {}
    for r in range(layout.world_size) if ranks is None else ranks:
        parts = [blocks[p.block][p.start:p.stop] for p in layout.pieces[r]]
        out[r] = full.new_empty(0) if not parts else parts[0] if len(parts) == 1 else torch.cat(parts)
    return out
