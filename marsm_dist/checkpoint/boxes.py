"""Where a rank's flat pieces of a tensor sit as rectangular boxes of the full tensor.

A checkpoint format keyed by full tensors (DCP's chunks) stores rectangular boxes. The sharding
engine describes what a rank holds as flat ranges of row-major blocks (:class:`MatrixLayout`):
a ZeRO partition may start mid-row, a Megatron TP rank holds a column block. Any flat range of
a row-major tensor is a short run of boxes (a partial first row, whole rows, a partial last row,
recursively), and their elements follow each other in the range's order, so each box is a plain
view of consecutive local elements. Pure functions; nothing here knows ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..sharding.layout import MatrixLayout, Piece

__all__ = ["Box", "flat_range_boxes", "piece_boxes"]


@dataclass(frozen=True)
class Box:
    """A rectangular part of a full tensor: ``offsets`` and ``sizes`` per dim; its elements are
    local elements ``[start, start + numel)`` of the rank's flattened local tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    start: int

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...],
                                                                                 tuple[int, ...]]]:
    """``(offsets, sizes)`` of the boxes that cover flat range ``[start, stop)`` of a row-major
    tensor of ``shape``, in flat order (at most ``2 * len(shape) - 1`` of them)."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one row: a box of that row, one high
        return [((first, *o), (1, *s)) for o, s in flat_range_boxes(shape[1:], start - first * inner,
                                                                    stop - first * inner)]
    boxes = []
    if start % inner:  # the partial first row
        boxes += flat_range_boxes(shape, start, (first + 1) * inner)
        first += 1
    whole_end = stop // inner
    if whole_end > first:  # the whole rows
        boxes.append(((first, *(0,) * (len(shape) - 1)), (whole_end - first, *shape[1:])))
    if stop % inner:  # the partial last row
        boxes += flat_range_boxes(shape, whole_end * inner, stop)
    return boxes


def piece_boxes(layout: MatrixLayout | None, shape: tuple[int, ...],
                pieces: tuple[Piece, ...] | None) -> list[Box]:
    """The boxes of the full tensor a rank holds: its ``pieces`` of ``layout`` (None: the whole
    tensor), each with where its elements start in the rank's flattened local tensor."""
    if layout is None or pieces is None:
        return [Box(o, s, 0) for o, s in flat_range_boxes(shape, 0, math.prod(shape))] if math.prod(
            shape) else []
    boxes, cursor = [], 0
    block_starts = [sum(layout.sizes[:b]) for b in range(layout.num_blocks)]
    for piece in pieces:
        block_shape = layout.block_shape_of(piece.block)
        for offsets, sizes in flat_range_boxes(block_shape, piece.start, piece.stop):
            moved = list(offsets)
            moved[layout.split_dim] += block_starts[piece.block]
            boxes.append(Box(tuple(moved), sizes, cursor))
            cursor += math.prod(sizes)
    return boxes
