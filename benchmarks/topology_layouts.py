"""Piece layouts of a model's matrices on each topology, at any world size, without processes.

The meshes follow common practice: HSDP shards within a node of 8 GPUs and replicates across
nodes; FSDP x TP runs tensor parallelism within a node (8) and FSDP across. Below 16 ranks both use
two replicas / two data-parallel ranks. Tensor-parallel styles are Megatron's: QKV (or q, k, v),
the MLP's up (and gate) projections column-parallel, the attention output and the MLP's down
projection row-parallel; ``fully_shard`` then splits each local block's rows over data parallel.
"""

from __future__ import annotations

from functools import cache

from marsm_dist.sharding.layout import MatrixLayout, from_runs, replicated, row_chunks

TOPOLOGIES = ("fsdp", "ddp", "hsdp", "fsdp_x_tp")
# Per block, in shapes.model_shapes order: "col" (column-parallel) or "row" (row-parallel).
STYLES = {"gpt": ["col", "row", "col", "row"], "llama": ["col", "col", "col", "row", "col", "col", "row"]}


def mesh_for(topology: str, world: int) -> tuple[int, int]:
    """(outer, inner) mesh: HSDP (replicate, shard), FSDP x TP (dp, tp); 1-D ones (world, 1)."""
    if topology in ("hsdp", "fsdp_x_tp"):
        inner = 8 if world >= 16 else world // 2
        return world // inner, inner
    return world, 1


def _chunk(lo: int, hi: int, parts: int, k: int) -> tuple[int, int]:
    """Part ``k`` of ``range(lo, hi)`` cut as ``torch.chunk`` does (ceil-sized, trailing empty)."""
    size = -(-(hi - lo) // parts)
    a = min(lo + k * size, hi)
    return a, min(a + size, hi)


def _runs(a: int, b: int) -> tuple[tuple[int, int], ...]:
    return ((a, b),) if b > a else ()


@cache
def layout(topology: str, shape: tuple[int, int], style: str, world: int) -> MatrixLayout:
    """The layout of one ``shape`` matrix over ``world`` ranks (global rank = outer * inner + i)."""
    outer, inner = mesh_for(topology, world)
    rows, cols = shape
    if topology == "fsdp":
        return row_chunks(shape, world)
    if topology == "ddp":
        return replicated(shape, world)
    runs, copies = [], []
    for rank in range(world):
        o, i = divmod(rank, inner)
        if topology == "hsdp":  # (Replicate(), Shard(0))
            runs.append((_runs(*_chunk(0, rows, inner, i)), ((0, cols),)))
            copies.append(o)
        elif style == "col":  # (_StridedShard(0), Shard(0)): the TP block's rows, then dp's chunk
            runs.append((_runs(*_chunk(*_chunk(0, rows, inner, i), outer, o)), ((0, cols),)))
        else:  # (Shard(0), Shard(1))
            runs.append((_runs(*_chunk(0, rows, outer, o)), _runs(*_chunk(0, cols, inner, i))))
    return from_runs(shape, runs, copies if topology == "hsdp" else None)


def model_layouts(topology: str, family: str, shapes: list[tuple[int, int]],
                  world: int) -> list[MatrixLayout]:
    styles = STYLES[family]
    return [layout(topology, s, styles[k % len(styles)], world) for k, s in enumerate(shapes)]


def received_bytes(layouts: list[MatrixLayout], owners: list[int], rank: int, itemsize: int = 2
                   ) -> tuple[int, int, int]:
    """(ours, minimum, all-gather) bytes ``rank`` receives in one step.

    Ours follows the exchange's rules: an owner receives its copy's other pieces; a rank of the
    owner's copy receives its pieces of the result by the scatter, a rank of another copy by the
    broadcast over its replica group. (tests/test_engine.py checks the real counters against the
    minimum.) Minimum: an owner must receive what it does not hold of its matrix, any other rank its
    pieces of the result. All-gather: the anchors' design, every rank gathers every full matrix."""
    ours = minimum = allgather = 0
    for lay, owner in zip(layouts, owners, strict=True):
        mine = lay.local_numel(rank)
        if owner == rank:
            ours += sum(lay.local_numel(r) for r in lay.copy_ranks(owner) if r != owner)
        else:
            ours += mine
        minimum += (lay.numel - mine) if owner == rank else mine
        allgather += lay.numel - mine
    return ours * itemsize, minimum * itemsize, allgather * itemsize
