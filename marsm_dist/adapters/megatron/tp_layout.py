"""Where a Megatron tensor-parallel (TP) shard sits in its full logical matrix: the one TP layout.

A TP weight (``tensor_model_parallel=True``) is a block of the full matrix along ``partition_dim``;
with ``partition_stride`` > 1 (SwiGLU's fc1) the full matrix is cut in ``TP size x stride`` blocks
and TP rank ``t`` holds blocks ``t, TP + t, 2 TP + t, ...``, one after another in its local tensor.
The layout is described over the tensor-and-data-parallel (TP x DP) group. Both optimizers use
:func:`tp_layout`: the replicated one (every DP rank holds its TP block whole, as a copy) and the
distributed one (each DP rank holds a flat range of its TP block's tensor, no copies).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from ...sharding.layout import MatrixLayout, Piece, flat_overlap

__all__ = ["coordinates", "group_coordinates", "tensor_and_data_parallel_group", "tp_block_count",
           "tp_block_pieces", "tp_layout"]


def tensor_and_data_parallel_group() -> dist.ProcessGroup | None:
    """Megatron's TP x DP group, or None when it is this rank alone."""
    group = parallel_state.get_tensor_and_data_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


def group_coordinates(group: dist.ProcessGroup, device: torch.device) -> list[tuple[int, int]]:
    """(tp rank, dp rank) of every rank of ``group``, in group-rank order (a collective).

    ``device`` is where the optimizer's tensors live: the device ``group``'s backend serves (NCCL
    serves CUDA tensors only, so a CPU tensor would fail there).
    """
    mine = torch.tensor([parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_data_parallel_rank()], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [(tp, dp) for tp, dp in torch.stack(everyone).tolist()]  # one host read, not 2 per rank


# id(group) -> (group, (tp rank, dp rank) of each of its ranks). The group is kept so its id is
# never reused by another group while the entry exists (Megatron's groups are rebuilt when its
# parallel state is destroyed and initialized again).
_COORDINATES: dict[int, tuple[dist.ProcessGroup, list[tuple[int, int]]]] = {}


def coordinates(group: dist.ProcessGroup, device: torch.device) -> list[tuple[int, int]]:
    """:func:`group_coordinates`, gathered once per group (the builder calls it on every rank;
    otherwise the first step's layouts do, on every rank too)."""
    entry = _COORDINATES.get(id(group))
    if entry is None or entry[0] is not group:
        entry = _COORDINATES[id(group)] = (group, group_coordinates(group, device))
    return entry[1]


def tp_block_count(p: Tensor) -> int:
    """How many blocks of the full matrix this TP rank's tensor holds (``partition_stride``)."""
    stride = getattr(p, "partition_stride", 1)
    if stride > 1 and p.partition_dim != 0:
        raise NotImplementedError(f"MARSM supports partition_stride > 1 only along dim 0; got stride "
                                  f"{stride} along dim {p.partition_dim} for a {tuple(p.shape)} shard")
    return stride


def tp_block_pieces(p: Tensor, tp_rank: int, tp_size: int, start: int, stop: int) -> tuple[Piece, ...]:
    """The pieces of the full matrix that the flat range ``[start, stop)`` of TP rank ``tp_rank``'s
    local tensor ``p`` is (its local tensor holds its blocks whole, one after another)."""
    stride = tp_block_count(p)
    block = p.numel() // stride
    pieces = []
    for j in range(stride):
        held = flat_overlap((j * block, (j + 1) * block), (start, stop))
        if held:
            pieces.append(Piece(j * tp_size + tp_rank, *held))
    return tuple(pieces)


def tp_layout(p: Tensor, coords: list[tuple[int, int]], tp_size: int,
              dp_ranges: Sequence[tuple[int, int]] | None = None) -> MatrixLayout:
    """The layout of TP shard ``p`` over the ranks ``coords`` ((tp rank, dp rank) per group rank).

    ``dp_ranges[d]``: the flat range of the local tensor that DP rank ``d`` holds (the distributed
    optimizer; one copy between them). None: every DP rank holds all of it, as its own copy.
    """
    dim = p.partition_dim
    full = list(p.shape)
    full[dim] *= tp_size
    whole = (0, p.numel())
    pieces = tuple(tp_block_pieces(p, t, tp_size, *(whole if dp_ranges is None else dp_ranges[d]))
                   for t, d in coords)
    copies = {d for _, d in coords}
    replicas = tuple(d for _, d in coords) if dp_ranges is None and len(copies) > 1 else None
    return MatrixLayout(tuple(full), pieces, split_dim=dim, num_blocks=tp_size * tp_block_count(p),
                        replicas=replicas)
