"""The pure parts of the sharding engine: piece layouts and the owner plan (no processes)."""

from __future__ import annotations

import math

import pytest
import torch

from marsm_dist.newton_schulz import newton_schulz_flops
from marsm_dist.sharding import MatrixLayout, Piece, assemble, cut, make_plan, row_chunks, whole
from marsm_dist.sharding.plan import plan_buckets, plan_owners


def test_row_chunks_follow_torch_chunk_with_empty_shards():
    for rows, world in [(30, 4), (7, 3), (3, 4), (8, 8), (1, 2)]:
        layout = row_chunks((rows, 5), world)
        sizes = [c.shape[0] for c in torch.arange(rows).chunk(world)]
        sizes += [0] * (world - len(sizes))
        assert [layout.local_numel(r) for r in range(world)] == [5 * s for s in sizes]


def flat_ranges(numel: int, bounds: list[int]) -> MatrixLayout:
    """A ZeRO-like layout: rank r holds [bounds[r], bounds[r+1]) of the flattened tensor."""
    return tuple((Piece(0, a, b),) if b > a else () for a, b in zip(bounds, bounds[1:], strict=False))


def test_assemble_and_cut_round_trip_for_every_layout_kind():
    full = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    layouts = [
        whole((6, 8)),
        row_chunks((6, 8), 4),
        MatrixLayout((6, 8), flat_ranges(48, [0, 13, 13, 40, 48])),  # mid-row starts, an empty rank
        # Two TP blocks along dim 1 (column-parallel halves), rank 1 holds pieces of both.
        MatrixLayout((6, 8), ((Piece(0, 0, 20),), (Piece(0, 20, 24), Piece(1, 0, 10)),
                              (Piece(1, 10, 24),)), split_dim=1, num_blocks=2),
    ]
    for layout in layouts:
        parts = cut(layout, full)
        assert [parts[r].numel() for r in range(layout.world_size)] == [
            layout.local_numel(r) for r in range(layout.world_size)]
        rebuilt = assemble(layout, parts, torch.float32)
        assert torch.equal(rebuilt, full)
    # The TP block is the column half, flattened row-major inside the block.
    tp = layouts[3]
    assert torch.equal(cut(tp, full)[2], full[:, 4:].reshape(-1)[10:])


@pytest.mark.parametrize("pieces", [
    ((Piece(0, 0, 10),), (Piece(0, 9, 20),)),     # overlap
    ((Piece(0, 0, 10),), (Piece(0, 11, 20),)),    # gap
    ((Piece(0, 0, 10),),),                        # does not cover
    ((Piece(0, 0, 25),),),                        # past the end
])
def test_layouts_that_do_not_tile_the_tensor_are_refused(pieces):
    with pytest.raises(ValueError):
        MatrixLayout((4, 5), pieces)


def test_round_robin_is_i_mod_w_and_balanced_beats_it():
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12  # GPT-2 small
    rr = make_plan(shapes, 8, "round_robin")
    assert rr.owners == tuple(i % 8 for i in range(len(shapes)))
    bal = make_plan(shapes, 8, "balanced")
    assert bal.flops_balance <= 1.05 < rr.flops_balance
    assert sum(bal.ns_flops) == sum(rr.ns_flops) == sum(newton_schulz_flops(s) for s in shapes)


def test_balanced_is_largest_first_greedy():
    # By cost: 9 -> rank 0 (loads 9, 0); 7 -> 1 (9, 7); 6 -> 1 (9, 13); 5 -> 0 (14, 13);
    # 4 -> 1 (14, 17).
    owners = plan_owners([4, 9, 6, 7, 5], 2, "balanced")
    assert owners == [1, 0, 1, 1, 0]
    loads = [sum(c for c, o in zip([4, 9, 6, 7, 5], owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(loads) == [14, 17]
    with pytest.raises(ValueError, match="owner_policy"):
        plan_owners([1], 2, "random")


def test_buckets_bound_what_one_rank_owns_per_round():
    numels = [100, 100, 100, 100, 250, 10]
    owners = [0, 0, 1, 0, 1, 0]
    buckets = plan_buckets(numels, owners, 2, bucket_numel=200)
    assert buckets == [(0, 1, 2), (3,), (4, 5)]  # 250 > 200 opens a round of its own
    for b in buckets:
        for r in (0, 1):
            owned = sum(numels[i] for i in b if owners[i] == r)
            assert owned <= 200 or sum(owners[i] == r for i in b) == 1


def test_plan_is_a_pure_function_with_a_stable_digest():
    shapes = [(30, 16), (7, 30), (3, 7)]
    a, b = make_plan(shapes, 4), make_plan(list(shapes), 4)
    assert a == b and a.digest() == b.digest()
    assert make_plan(shapes, 3).digest() != a.digest()
    assert math.isclose(make_plan(shapes, 1).flops_balance, 1.0)


def test_layouts_from_index_runs_round_trip():
    """2-D splits as DTensor placements make them: column blocks (uneven) with row ranges inside,
    rows of a strided split, and a generic fallback (two column runs on one rank)."""
    from marsm_dist.sharding.layout import from_runs

    full = torch.arange(5 * 7, dtype=torch.float32).view(5, 7)
    cases = {
        # (Shard(0), Shard(1)) on 2x2 with 7 columns: blocks of 4 and 3 columns, rows 3/2.
        "row x col": [(((0, 3),), ((0, 4),)), (((0, 3),), ((4, 7),)), (((3, 5),), ((0, 4),)),
                      (((3, 5),), ((4, 7),))],
        # Rows only, strided: rank 0 rows 0-1, rank 1 rows 3, rank 2 rows 2, rank 3 row 4.
        "strided rows": [(((0, 2),), ((0, 7),)), (((3, 4),), ((0, 7),)), (((2, 3),), ((0, 7),)),
                         (((4, 5),), ((0, 7),))],
        # One rank holds columns 0-1 and 5-6 (two runs): every run is its own piece.
        "two runs": [(((0, 5),), ((0, 2), (5, 7))), (((0, 5),), ((2, 5),))],
    }
    for name, runs in cases.items():
        layout = from_runs((5, 7), runs)
        parts = cut(layout, full)
        for r, rr in enumerate(runs):
            rows = [i for a, b in rr[0] for i in range(a, b)]
            cols = [j for a, b in rr[1] for j in range(a, b)]
            assert torch.equal(parts[r], full[rows][:, cols].reshape(-1)), (name, r)
        assert torch.equal(assemble(layout, parts, torch.float32), full), name
    assert from_runs((5, 7), cases["row x col"]).block_sizes == (4, 3)


def test_copies_each_cover_the_matrix():
    from marsm_dist.sharding.layout import replicated

    layout = replicated((4, 3), 3)
    assert layout.num_replicas == 3 and layout.copy_ranks(1) == [1]
    half = row_chunks((4, 3), 2).pieces
    hsdp = MatrixLayout((4, 3), half * 2, replicas=(0, 0, 1, 1))
    assert hsdp.copy_ranks(3) == [2, 3]
    with pytest.raises(ValueError, match="cover"):  # copy 1 lacks the second half
        MatrixLayout((4, 3), half + (half[0], ()), replicas=(0, 0, 1, 1))
