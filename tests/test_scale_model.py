"""benchmarks/scale_model.py: the byte breakdown, the Newton-Schulz times and the split formula, by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks import scale_model as sm
from benchmarks.shapes import model_shapes, moe_shapes
from benchmarks.topology_layouts import layout, received_bytes
from marsm_dist.newton_schulz import newton_schulz_flops
from marsm_dist.sharding import make_plan
from marsm_dist.sharding.experts import per_expert
from marsm_dist.sharding.layout import from_runs

SHAPES = [(40, 24), (24, 56), (16, 16)]
W = 16


def _args(**kw):
    args = sm.parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("topology", sm.SCALE_TOPOLOGIES)
@pytest.mark.parametrize("owners", [None, (0, 5, 13), (15, 15, 8)])
@pytest.mark.parametrize("gpus_per_node", [4, 8, 16])
def test_breakdown_sums_to_received_bytes(topology, owners, gpus_per_node):
    layouts = [layout(topology, s, "col", W) for s in SHAPES]
    owners = list(make_plan(SHAPES, W).owners if owners is None else owners)
    for rank in range(W):
        ours, _, allgather = received_bytes(layouts, owners, rank)
        intra, inter = sm.received_split(layouts, owners, rank, gpus_per_node)
        assert intra + inter == ours
        ag_intra, ag_inter = sm.allgather_split(layouts, rank, gpus_per_node)
        assert ag_intra + ag_inter == allgather
        if gpus_per_node == W:  # one node: nothing crosses
            assert inter == ag_inter == 0


def test_breakdown_by_hand():
    # 16 x 16 over 16 ranks, one row (16 elements, 32 bytes) each; nodes of 8; owner rank 5.
    shape, owners = [(16, 16)], [5]
    fsdp = [layout("fsdp", shape[0], "col", W)]
    assert sm.received_split(fsdp, owners, 5, 8) == (7 * 32, 8 * 32)  # gathers 7 rows near, 8 far
    assert sm.received_split(fsdp, owners, 2, 8) == (32, 0)  # its row of the result, from rank 5
    assert sm.received_split(fsdp, owners, 12, 8) == (0, 32)
    ddp = [layout("ddp", shape[0], "col", W)]
    assert sm.received_split(ddp, owners, 5, 8) == (0, 0)  # owns a whole copy
    assert sm.received_split(ddp, owners, 3, 8) == (512, 0)  # the whole result from rank 5
    assert sm.received_split(ddp, owners, 9, 8) == (0, 512)
    # HSDP 2 x 8: copy 0 = ranks 0-7, copy 1 = ranks 8-15, two rows (64 bytes) each.
    hsdp = [layout("hsdp", shape[0], "col", W)]
    assert sm.received_split(hsdp, owners, 5, 8) == (7 * 64, 0)
    assert sm.received_split(hsdp, owners, 1, 8) == (64, 0)
    assert sm.received_split(hsdp, owners, 13, 8) == (0, 64)  # broadcast from rank 5, same rows
    assert sm.received_split(hsdp, owners, 13, 16) == (64, 0)
    assert sm.allgather_split(hsdp, 13, 8) == (7 * 64, 0)
    assert sm.allgather_split(fsdp, 13, 8) == (7 * 32, 8 * 32)


def test_ns_time_by_hand():
    args = _args()
    rate = 989e12 * 0.6
    expected = 5 * (2 * 4096**3 + 4096**3) * 2 / rate
    assert sm.ns_seconds(newton_schulz_flops((4096, 4096)), args) == pytest.approx(expected, rel=1e-12)
    assert sm.split_member_seconds((4096, 4096), 1, args) == pytest.approx(expected, rel=1e-12)
    assert 1e3 * expected == pytest.approx(3.474, abs=1e-3)  # ms: 2.06e12 FLOPs at 593.4 TFLOP/s


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 8192), (28672, 8192)])
def test_split_k1_is_plain_cost(shape):
    args = _args()
    assert sm.split_member_seconds(shape, 1, args) == pytest.approx(
        newton_schulz_flops(shape) / sm.flop_rate(args), rel=1e-12)


def test_split_by_hand():
    args = _args()
    m, n, k = 4096, 14336, 4
    macs = 2 * m * m * n / k + m**3
    allreduce = 2 * (k - 1) / k * 2 * m * m
    expected = 5 * (2 * macs / (989e12 * 0.6) + allreduce / 450e9)
    assert sm.split_member_seconds((n, m), k, args) == pytest.approx(expected, rel=1e-12)
    assert sm.split_member_seconds((n, m), 8, args) < sm.split_member_seconds((n, m), 2, args)


def test_more_ranks_than_matrices_critical_path_is_largest_matrix():
    shapes, _ = model_shapes("llama3-70b")
    plan = make_plan(shapes, 1024, "balanced")
    assert len(shapes) == 560 < 1024
    assert plan.critical_path_flops == max(plan.costs) == newton_schulz_flops((28672, 8192))
    args = _args(sample_ranks=8)
    rows = sm.scale_rows(args, models=("llama3-70b",), worlds=(1024,), topologies=("fsdp",))
    (row,) = rows
    largest_ms = 1e3 * sm.split_member_seconds((28672, 8192), 1, args)
    assert row["ns_crit_ms"] == pytest.approx(largest_ms, rel=1e-12)
    assert row["ns_ideal_ms"] == pytest.approx(1e3 * sum(plan.costs) / 1024 / sm.flop_rate(args), rel=1e-12)
    assert row["idle_share"] == pytest.approx(1 - row["ns_ideal_ms"] / row["ns_crit_ms"], rel=1e-12)
    assert row["marsm_step_ms"] <= row["marsm_step_serial_ms"]
    assert row["allgather_ns_ms"] == pytest.approx(row["ns_ideal_ms"] * 1024, rel=1e-9)
    # FSDP: the share of every parameter is rows over W, rank 0 holding the most (torch.chunk).
    _, others = model_shapes("llama3-70b")
    local = sum(s[0] // 1024 * math.prod(s[1:]) for s in shapes) + sum(
        -(-s[0] // 1024) * math.prod(s[1:]) for s in others)
    assert row["adamw_step_ms"] == pytest.approx(1e3 * local * 28 / 3350e9, rel=1e-12)


def test_other_params_share():
    assert sm.other_local_numel((128256, 4096), "ddp", 64, 3) == 128256 * 4096
    assert sm.other_local_numel((4096,), "fsdp", 1024, 0) == 4
    assert sm.other_local_numel((4096,), "hsdp", 64, 9) == 512  # 8 x 8: rows over the 8 ranks of a copy
    assert sm.other_local_numel((10, 3), "fsdp", 4, 3) == 1 * 3  # torch.chunk: 3, 3, 3, 1 rows


def test_split_estimate():
    args = _args()
    rows = {r["world"]: r for r in sm.split_rows(args, [], models=("llama3-70b",), worlds=(64, 1024))}
    # W=1024: 560 matrices, one round; the largest split 8 ways (20.0 ms) fits under the ideal (21.8 ms).
    r = rows[1024]
    assert r["ns_bound_ms"] == r["ns_crit_ms"] == pytest.approx(r["member_ms"][1])
    assert r["member_ms"][8] < r["ns_ideal_ms"] < r["member_ms"][4]
    assert r["ns_crit_split_simple_ms"] == pytest.approx(r["ns_ideal_ms"])
    # ...but 240 MLP matrices x 8 members do not fit 1024 ranks: the capacity estimate sits higher.
    assert r["ns_ideal_ms"] < r["ns_crit_split_ms"] < r["ns_crit_ms"]
    # W=64: whole matrices can reach the ideal; the gap is the rounds', which splitting keeps.
    r = rows[64]
    assert r["ns_bound_ms"] == pytest.approx(r["ns_ideal_ms"]) and r["ns_crit_ms"] > r["ns_bound_ms"]
    assert r["ns_crit_split_ms"] == pytest.approx(r["ns_crit_ms"]) and r["ns_saves_ms"] == pytest.approx(0)
    assert r["ns_crit_split_simple_ms"] == pytest.approx(r["ns_crit_ms"]) and r["k_largest"] == 1


def test_split_bound_by_hand():
    # 4 equal 4096 x 14336 matrices on 4 ranks: nothing to split, the ideal is one matrix each.
    args = _args()
    one = sm.split_member_seconds((4096, 14336), 1, args)
    simple, capacity, ks = sm.split_bound([(4096, 14336)] * 4, 4, args)
    assert simple == pytest.approx(one) and capacity == pytest.approx(one) and ks == {(4096, 14336): 1}
    # 1 matrix on 8 ranks: the best split is k=8, and there are ranks for it.
    simple, capacity, ks = sm.split_bound([(4096, 14336)], 8, args)
    eight = sm.split_member_seconds((4096, 14336), 8, args)
    assert simple == pytest.approx(eight) and capacity == pytest.approx(eight) and ks == {(4096, 14336): 8}
    # 8 of them on 8 ranks: a split costs more rank-time than it saves, so none is split.
    simple, capacity, ks = sm.split_bound([(4096, 14336)] * 8, 8, args)
    assert capacity == pytest.approx(one) and ks == {(4096, 14336): 1}
    # 2 on 8 ranks: k=4 each fills the 8 ranks.
    simple, capacity, ks = sm.split_bound([(4096, 14336)] * 2, 8, args)
    assert ks == {(4096, 14336): 4}
    assert capacity == pytest.approx(sm.split_member_seconds((4096, 14336), 4, args))


# --- mixture of experts ---------------------------------------------------------------------------

MOE = "qwen3-30b-a3b-like"


@pytest.fixture(scope="module")
def moe_small():
    """Qwen3-30B-A3B-like with 4 MoE layers at EP 8 x 8 (W = 64), every rank evaluated."""
    shapes, expert_of, experts = moe_shapes(MOE, 4)
    layouts = sm.moe_layouts(shapes, expert_of, experts, 8, 64)
    plan = make_plan(shapes, 64, "balanced", candidates=[lay.preferred_owners for lay in layouts])
    row = sm.moe_row(MOE, shapes, expert_of, experts, 8, 64, _args(sample_ranks=0))
    return shapes, expert_of, layouts, plan, row


def test_expert_layout_is_per_expert_of_the_stacked_weight():
    # (E=8, 6, 4) experts, EP 4 x EDP 2 over 8 ranks: Shard(0) over EP, replicated over EDP.
    ep, world, experts, shape = 4, 8, 8, (6, 4)
    per = experts // ep
    runs = [(((r % ep * per, r % ep * per + per),), ((0, 6),), ((0, 4),)) for r in range(world)]
    stacked = from_runs((experts, *shape), runs, [r // ep for r in range(world)])
    for e, (lay, _) in enumerate(per_expert(stacked)):
        ours = sm.expert_layout(shape, e // per, ep, world)
        assert (ours.pieces, ours.replicas) == (lay.pieces, lay.replicas)
        assert ours.preferred_owners == lay.preferred_owners == tuple(range(e // per, world, ep))


def test_moe_shapes():
    shapes, expert_of, experts = moe_shapes(MOE)
    assert experts == 128 and len(shapes) == 48 * (4 + 128 * 3)
    assert shapes[:7] == [(4096, 2048), (512, 2048), (512, 2048), (2048, 4096), (768, 2048), (768, 2048),
                          (2048, 768)]
    assert expert_of[:7] == [None] * 4 + [0] * 3
    shapes, expert_of, experts = moe_shapes("deepseek-v3-like", 1)
    assert experts == 256 and len(shapes) == 3 * 7 + 4 + 3 + 256 * 3  # 3 dense layers, a shared expert
    assert shapes[4] == (18432, 7168) and shapes[-1] == (7168, 2048)
    assert sum(e is None for e in expert_of) == 3 * 7 + 4 + 3


def test_candidate_bound_by_hand():
    # 4 ranks; three 10s pinned to ranks {0, 1}, a free 2: those two ranks take 30 between them,
    # one at least 20 (two of them), above the mean 8 and the largest 10.
    assert sm.candidate_bound([10, 10, 10, 2], [(0, 1), (0, 1), (0, 1), None], 4) == 20
    # A set inside another counts for it: {0, 1} must take all three 4s (the one pinned to {0}
    # too), so one of its two ranks takes two; {0, 1}'s own two alone would allow 4.
    assert sm.candidate_bound([4, 4, 4], [(0,), (0, 1), (0, 1)], 8) == 8
    assert sm.candidate_bound([4, 4], [(0, 1), (0, 1)], 8) == 4
    assert sm.candidate_bound([4, 4, 4], [None] * 3, 8) == 4


def test_moe_bytes_and_calls_by_hand():
    # Two (4, 8) experts, EP 2 x 2 on 4 ranks (nodes of 2): expert 0 on ranks 0 and 2, expert 1 on
    # 1 and 3. The owner (a holder) gathers nothing; the other copy, in the other node, receives
    # the 32-element result (64 bytes). Floor: 2 x 32 elements x 2 bytes over 4 ranks.
    args = _args(sample_ranks=0, gpus_per_node=2)
    row = sm.moe_row("t", [(4, 8), (8, 4)], [0, 1], 2, 2, 4, args)
    assert row["expert_gather_bytes"] == 0 and row["experts_off_holders"] == 0
    assert row["bytes_max_rank"] == row["bytes_min_max_rank"] == 64
    assert row["comm_inter_bytes"] == 64 and row["comm_intra_bytes"] == 0
    assert row["bytes_floor"] == 32
    assert row["ns_calls_batched_max"] == row["ns_calls_unbatched_max"] == 1
    assert row["ns_crit_flops"] == row["ns_bound_flops"] == newton_schulz_flops((4, 8))


def test_ns_calls_by_hand():
    # Each rank owns three matrices of one shape up to a transpose and one other, in one round.
    shapes = [(8, 16), (8, 16), (16, 8), (4, 4)] * 2
    plan = make_plan(shapes, 2, "balanced", candidates=[(0,)] * 4 + [(1,)] * 4)
    assert plan.owners == (0, 0, 0, 0, 1, 1, 1, 1) and len(plan.buckets) == 1
    batched, single = sm.ns_calls(plan, shapes)
    assert batched == [[2, 2]] and single == [[4, 4]]
    args = _args(launch_us=10.0)
    flops = sum(newton_schulz_flops(s) for s in shapes[:4])  # one rank's: both alike
    assert sm.launch_path_seconds(plan, batched, args) == pytest.approx(
        sm.ns_seconds(flops, args) + 2 * 5 * 3 * 10e-6, rel=1e-12)
    assert sm.launch_path_seconds(plan, single, args) == pytest.approx(
        sm.ns_seconds(flops, args) + 4 * 5 * 3 * 10e-6, rel=1e-12)


def test_moe_experts_stay_on_their_holders(moe_small):
    shapes, expert_of, layouts, plan, row = moe_small
    per = 128 // 8
    for i, e in enumerate(expert_of):
        if e is not None:
            owner = plan.owners[i]
            assert owner % 8 == e // per  # one of the ranks of the expert's EP coordinate
            assert layouts[i].local_numel(owner) == layouts[i].numel
            assert owner in layouts[i].preferred_owners
    experts = [i for i, e in enumerate(expert_of) if e is not None]
    for rank in range(64):  # what owners receive of their own experts: nothing
        mine = [i for i in experts if plan.owners[i] == rank]
        assert sm.received_split([layouts[i] for i in mine], [rank] * len(mine), rank) == (0, 0)
    assert row["expert_gather_bytes"] == 0 and row["experts_off_holders"] == 0
    assert row["ranks_evaluated"] == 64
    assert row["bytes_max_rank"] == row["bytes_min_max_rank"] >= row["bytes_floor"] > 0
    assert row["ns_calls_batched_max"] < row["ns_calls_unbatched_max"]


def test_moe_bound_is_a_bound(moe_small):
    *_, plan, row = moe_small
    assert row["ns_crit_flops"] == plan.critical_path_flops >= max(plan.ns_flops) >= row["ns_bound_flops"]
    # The per-EP-group bound: 16 experts x 4 layers x 3 matrices of one coordinate over its 8 ranks.
    expert = newton_schulz_flops((768, 2048))
    assert row["ns_bound_flops"] >= 16 * 4 * 3 * expert // 8


def test_moe_critical_path_within_target(moe_small):
    *_, row = moe_small
    assert row["ns_crit_flops"] <= sm.MOE_TARGET * row["ns_bound_flops"]


def test_moe_rows_grid():
    rows = sm.moe_rows(_args(sample_ranks=4), models=(MOE,), eps=(8, 16), worlds=(8, 32), layers=4)
    assert [(r["ep"], r["world"]) for r in rows] == [(8, 8), (8, 32), (16, 32)]
    for r in rows:
        assert r["expert_gather_bytes"] == 0 and r["edp"] == r["world"] // r["ep"]
        assert r["ns_crit_flops"] >= r["ns_bound_flops"]
        assert r["meets_target"] == (r["crit_over_bound"] <= sm.MOE_TARGET)
