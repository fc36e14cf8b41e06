"""Where each rank's local tensor sits inside a full logical tensor: the piece layout.

A full tensor of logical shape ``shape`` is cut into ``num_blocks`` equal tensor-parallel blocks
along ``split_dim`` (one block when there is no tensor parallelism). A *piece* is a flat range
``[start, stop)`` of one block's row-major flattening. A rank's local tensor, flattened, is the
concatenation of its pieces in order. This one description covers a single process (one piece,
everything), FSDP2 ``Shard(0)`` (one run of whole rows), ZeRO flat partitions (any range, may
start mid-row) and Megatron TP splits (a block, or a range inside one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MatrixLayout", "Piece", "assemble", "cut", "row_chunks", "whole"]


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
    """

    shape: tuple[int, ...]
    pieces: tuple[tuple[Piece, ...], ...]
    split_dim: int = 0
    num_blocks: int = 1

    def __post_init__(self) -> None:
        if self.shape[self.split_dim] % self.num_blocks:
            raise ValueError(f"dim {self.split_dim} of {self.shape} does not split into "
                             f"{self.num_blocks} blocks")
        covered = sorted((p.block, p.start, p.stop) for rank in self.pieces for p in rank if p.numel)
        expected, position = self.block_numel, {}
        for block, start, stop in covered:
            if not (0 <= block < self.num_blocks and 0 <= start < stop <= expected):
                raise ValueError(f"piece {(block, start, stop)} is outside {self.shape}")
            if start != position.get(block, 0):
                raise ValueError(f"pieces of {self.shape} overlap or leave a gap at block {block}")
            position[block] = stop
        if any(position.get(b, 0) != expected for b in range(self.num_blocks)):
            raise ValueError(f"pieces of {self.shape} do not cover every element exactly once")

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def block_shape(self) -> tuple[int, ...]:
        s = list(self.shape)
        s[self.split_dim] //= self.num_blocks
        return tuple(s)

    @property
    def block_numel(self) -> int:
        return self.numel // self.num_blocks

    def local_numel(self, rank: int) -> int:
        return sum(p.numel for p in self.pieces[rank])


def whole(shape: tuple[int, ...], world_size: int = 1, holder: int = 0) -> MatrixLayout:
    """One rank (``holder``) holds the whole tensor; the others hold nothing."""
    n = math.prod(shape)
    pieces = tuple((Piece(0, 0, n),) if r == holder else () for r in range(world_size))
    return MatrixLayout(tuple(shape), pieces)


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


def _blocks_of(layout: MatrixLayout, full: Tensor) -> list[Tensor]:
    """The full tensor's blocks, each flattened (copies only when a block is not contiguous)."""
    if layout.num_blocks == 1:
        return [full.reshape(-1)]
    return [b.reshape(-1) for b in full.chunk(layout.num_blocks, dim=layout.split_dim)]


def assemble(layout: MatrixLayout, parts: dict[int, Tensor], dtype: torch.dtype) -> Tensor:
    """Rebuild the full tensor from every rank's flat local data (``parts[rank]``)."""
    device = next(iter(parts.values())).device
    blocks = torch.empty(layout.num_blocks, layout.block_numel, dtype=dtype, device=device)
    for rank, flat in parts.items():
        offset = 0
        for piece in layout.pieces[rank]:
            blocks[piece.block, piece.start:piece.stop] = flat[offset:offset + piece.numel]
            offset += piece.numel
    if layout.num_blocks == 1:
        return blocks.view(layout.shape)
    return torch.cat([b.view(layout.block_shape) for b in blocks], dim=layout.split_dim)


def cut(layout: MatrixLayout, full: Tensor) -> list[Tensor]:
    """Every rank's flat local data of ``full`` (its pieces, concatenated), indexed by rank."""
    blocks = _blocks_of(layout, full)
    out = []
    for pieces in layout.pieces:
        parts = [blocks[p.block][p.start:p.stop] for p in pieces]
        out.append(full.new_empty(0) if not parts else parts[0] if len(parts) == 1 else torch.cat(parts))
    return out
