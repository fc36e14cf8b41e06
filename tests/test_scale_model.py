"""benchmarks/scale_model.py: the byte breakdown, the Newton-Schulz times and the split formula, by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks import scale_model as sm
from benchmarks.shapes import model_shapes
from benchmarks.topology_layouts import layout, received_bytes
from marsm_dist.newton_schulz import newton_schulz_flops
from marsm_dist.sharding import make_plan

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
