"""Where a Megatron tensor-parallel (TP) shard sits in its full logical matrix: the one TP layout.

A TP weight (``tensor_model_parallel=True``) is a block of the full matrix along ``partition_dim``;
with ``partition_stride`` > 1 (SwiGLU's fc1) the full matrix is cut in ``TP size x stride`` blocks
and TP rank ``t`` holds blocks ``t, TP + t, 2 TP + t, ...``, one after another in its local tensor.
The layout is described over the tensor-and-data-parallel (TP x DP) group. Both optimizers use
:func:`tp_layout`: the replicated one (every DP rank holds its TP block whole, as a copy) and the
distributed one (each DP rank holds a flat range of its TP block's tensor, no copies).

The replicated optimizer's job group also takes in context parallelism (:func:`job_group`: TP x DP x
CP; CP ranks hold copies, as DP ranks do), and describes expert-parallel (MoE) weights over it too
(:func:`expert_layout`): local expert ``i`` of every expert-parallel (EP) rank, stacked, is one
``(EP, *expert)`` tensor whose dim 0 is the EP rank (Megatron's global expert ``ep * local + i``),
each expert cut in expert-TP (ETP) blocks, with a copy per expert-data-parallel (EDP) rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from ...sharding.layout import MatrixLayout, Piece, flat_overlap

__all__ = ["RankCoordinates", "copies_group", "expert_layout", "job_group",
           "rank_coordinates", "tensor_and_data_parallel_group", "tp_block_count", "tp_block_pieces",
           "tp_layout"]


def tensor_and_data_parallel_group() -> dist.ProcessGroup | None:
    """Megatron's TP x DP group, or None when it is this rank alone."""
    group = parallel_state.get_tensor_and_data_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


class RankCoordinates(NamedTuple):
    """Where a rank sits in Megatron's dense and expert grids (one pipeline stage)."""

    tp: int  # tensor-parallel rank
    dp: int  # data-parallel rank, context parallelism included (a copy of the dense weights)
    etp: int  # expert-tensor-parallel rank
    ep: int  # expert-parallel rank: which experts it holds
    edp: int  # expert-data-parallel rank (CP folded in by Megatron): a copy of its experts


def _with_cp() -> bool:
    return parallel_state.get_context_parallel_world_size() > 1


def job_group() -> dist.ProcessGroup | None:
    """The replicated optimizer's job group: Megatron's TP x DP group, with CP when CP > 1 (the
    same ranks as ETP x EP x EDP), or None when it is this rank alone."""
    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=_with_cp())
    return group if dist.get_world_size(group) > 1 else None


def copies_group() -> dist.ProcessGroup:
    """The ranks that hold this rank's dense TP block, one per copy: DP (x CP)."""
    return parallel_state.get_data_parallel_group(with_context_parallel=_with_cp())


def _gather_coordinates(group: dist.ProcessGroup, device: torch.device) -> list[RankCoordinates]:
    ps = parallel_state
    mine = torch.tensor([ps.get_tensor_model_parallel_rank(),
                         ps.get_data_parallel_rank(with_context_parallel=True),
                         ps.get_expert_tensor_parallel_rank(), ps.get_expert_model_parallel_rank(),
                         ps.get_expert_data_parallel_rank()], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return [RankCoordinates(*c) for c in torch.stack(everyone).tolist()]  # one host read


# id(group) -> (group, coordinates of each of its ranks). The group is kept so its id is never
# reused by another group while the entry exists (Megatron's groups are rebuilt when its parallel
# state is destroyed and initialized again).
_COORDINATES: dict[int, tuple[dist.ProcessGroup, list[RankCoordinates]]] = {}


def rank_coordinates(group: dist.ProcessGroup, device: torch.device) -> list[RankCoordinates]:
    """Every rank of ``group``'s coordinates, in group-rank order: gathered once per group (a
    collective: the builder calls it on every rank; otherwise the first layouts do, on every rank).
    ``device``: where the optimizer's tensors live (NCCL serves CUDA tensors only)."""
    entry = _COORDINATES.get(id(group))
    if entry is None or entry[0] is not group:
        entry = _COORDINATES[id(group)] = (group, _gather_coordinates(group, device))
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


def expert_layout(p: Tensor, coords: Sequence[RankCoordinates], etp_size: int,
                  edp_ranges: Sequence[tuple[int, int]] | None = None) -> MatrixLayout:
    """The layout of expert-parallel tensor ``p`` (one local expert's weight or bias) over the ranks
    ``coords``: the ``(EP, *full expert)`` tensor of this local expert on every EP rank.

    A rank holds its EP rank's expert: its ETP block(s) of it (TP-marked tensors, blocks as in
    :func:`tp_layout`, ``partition_stride`` included), copies over the EDP ranks; or all of it (the
    others, e.g. a row-parallel layer's bias), copies over the EDP and ETP ranks.
    ``edp_ranges[d]``: the flat range of the local tensor that expert-DP rank ``d`` holds (the
    distributed optimizer; TP-marked tensors only; one copy between them).
    """
    ep_size = max(c.ep for c in coords) + 1
    if getattr(p, "tensor_model_parallel", False):
        stride, dim = tp_block_count(p), p.partition_dim
        per_block = p.numel() // stride  # one expert's share of one block
        full = [ep_size, *p.shape]
        full[1 + dim] *= etp_size
        held = [(0, p.numel()) if edp_ranges is None else edp_ranges[c.edp] for c in coords]
        pieces = tuple(tuple(Piece(q.block, c.ep * per_block + q.start, c.ep * per_block + q.stop)
                             for q in tp_block_pieces(p, c.etp, etp_size, *h))
                       for c, h in zip(coords, held, strict=True))
        replicas = [c.edp for c in coords] if edp_ranges is None else [0] * len(coords)
        split, blocks = 1 + dim, etp_size * stride
    else:
        n = p.numel()
        full, split, blocks = [ep_size, *p.shape], 0, 1
        pieces = tuple((Piece(0, c.ep * n, (c.ep + 1) * n),) for c in coords)
        replicas = [c.edp * etp_size + c.etp for c in coords]
    return MatrixLayout(tuple(full), pieces, split_dim=split, num_blocks=blocks,
                        replicas=tuple(replicas) if len(set(replicas)) > 1 else None)


def dp_range_layout(p: Tensor, coords: Sequence[RankCoordinates], dp_ranges: Sequence[tuple[int, int]]
                    ) -> MatrixLayout:
    """The full layout of a dense parameter under the distributed optimizer, whatever its branch:
    TP-marked ones as :func:`tp_layout`; the others are copies on every TP rank, cut over the DP
    ranks by ``dp_ranges`` (one copy per TP rank). The neutral checkpoint form reads it."""
    tp_size = max(c.tp for c in coords) + 1
    if getattr(p, "tensor_model_parallel", False):
        return tp_layout(p, [(c.tp, c.dp) for c in coords], tp_size, dp_ranges)
    pieces = tuple((Piece(0, *dp_ranges[c.dp]),) if dp_ranges[c.dp][1] > dp_ranges[c.dp][0] else ()
                   for c in coords)
    return MatrixLayout(tuple(p.shape), pieces, replicas=tuple(c.tp for c in coords) if tp_size > 1 else None)
