"""A tensor whose dim 0 indexes independent matrices (MoE experts), described one expert at a time.

Each expert becomes a matrix of its own for the rest of the step (its own clip norm, Newton-Schulz
and scale): the optimizer gives it a slot with the layout and local offset computed here.
"""

from __future__ import annotations

import math

from .adapter import Slot
from .layout import MatrixLayout, Piece, _merged

__all__ = ["expert_slots", "per_expert"]


def per_expert(layout: MatrixLayout) -> list[tuple[MatrixLayout, tuple[int, ...]]]:
    """A tensor of shape ``(E, *rest)`` whose dim 0 indexes independent matrices (MoE experts),
    described per expert: for each ``e``, the layout of ``full[e]`` (shape ``rest``) over the same
    ranks and copies, and where each rank's elements of it start in that rank's flat local data.

    Every rank's elements of one expert must be one run of its local data (true of any DTensor
    placement, flat ZeRO ranges and tensor-parallel blocks, since dim 0 is the outermost); a layout
    where they are not is refused.
    """
    experts = layout.shape[0]
    rest = tuple(layout.shape[1:])
    if layout.num_blocks > 1 and layout.split_dim == 0:
        firsts = [sum(layout.sizes[:b]) for b in range(layout.num_blocks)]
    pieces: list[list[list[Piece]]] = [[[] for _ in range(layout.world_size)] for _ in range(experts)]
    starts = [[-1] * layout.world_size for _ in range(experts)]
    ends = [[-1] * layout.world_size for _ in range(experts)]
    for r, held in enumerate(layout.pieces):
        local = 0
        for piece in held:
            if layout.num_blocks > 1 and layout.split_dim == 0:  # blocks are runs of whole experts
                size, first, block = math.prod(rest), firsts[piece.block], 0
            else:
                size, first, block = layout.block_numel_of(piece.block) // experts, 0, piece.block
            for k in range(piece.start // size, (piece.stop - 1) // size + 1):
                a, b = max(piece.start, k * size), min(piece.stop, (k + 1) * size)
                e, at = first + k, local + a - piece.start
                if ends[e][r] not in (-1, at):
                    raise ValueError(f"rank {r}'s elements of expert {e} of a {layout.shape} tensor are "
                                     "not one run of its local data; it cannot be described per expert")
                if starts[e][r] < 0:
                    starts[e][r] = at
                ends[e][r] = at + b - a
                pieces[e][r].append(Piece(block, a - k * size, b - k * size))
            local += piece.numel
    split_dim = 0 if layout.split_dim == 0 else layout.split_dim - 1
    blocks = 1 if layout.split_dim == 0 else layout.num_blocks
    sizes = None if layout.split_dim == 0 else layout.block_sizes
    return [(MatrixLayout(rest, tuple(_merged(p) for p in pieces[e]), split_dim, blocks, layout.replicas,
                          sizes),
             tuple(max(s, 0) for s in starts[e])) for e in range(experts)]


def expert_slots(slot: Slot, layout: MatrixLayout | None, rank: int, raw: str | None
                 ) -> list[tuple[Slot, MatrixLayout | None, str]]:
    """``slot`` (dim 0: experts) as one slot per expert: its own shape, layout and place in the
    container's local data (``rank``: this rank in the layout's group), so the rest of the step
    treats each expert as a matrix of its own. ``raw``: the tensor's name, for messages."""
    base = slot.offset if slot.numel >= 0 else 0
    shape = tuple(slot.shape[1:])
    n = math.prod(shape)
    if layout is None:
        cuts = [(None, base + e * n, n) for e in range(slot.shape[0])]
    else:
        cuts = [(lay, base + starts[rank], lay.local_numel(rank)) for lay, starts in per_expert(layout)]
    out = []
    for e, (lay, offset, numel) in enumerate(cuts):
        label = f"{raw}[{e}]" if raw is not None else None
        part = Slot(shape, lay, offset, numel, label, e)
        out.append((part, lay, repr(label) if label else f"expert {e} of slot of {shape}"))
    return out
