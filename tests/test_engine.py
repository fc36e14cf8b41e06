"""The sharding engine over real gloo process groups, on synthetic layouts of every kind: whole
rows (FSDP2), flat ranges that start mid-row and span ranks (ZeRO), tensor-parallel blocks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from marsm_dist.newton_schulz import NS_COEFFICIENTS, newton_schulz
from marsm_dist.orthogonalize import NSConfig
from marsm_dist.sharding import MatrixLayout, Piece, ShardingEngine, cut, row_chunks
from marsm_dist.sharding.exchange import ReplicaGroup
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
FP32 = NSConfig(5, torch.float32, NS_COEFFICIENTS)


def layouts_for(world_size: int) -> list[MatrixLayout]:
    """Six matrices: row shards, two same-shape flat-range (ZeRO-like) ones, a TP one, a tiny one."""
    out = [row_chunks((10, 6), world_size), row_chunks((3, 5), world_size)]
    for shape, cuts in [((9, 7), [0, 20, 21, 50]), ((9, 7), [0, 0, 40, 63])]:
        bounds = [min(c, 63) for c in cuts[:world_size]] + [63]
        out.append(MatrixLayout(shape, tuple((Piece(0, a, b),) if b > a else ()
                                             for a, b in zip(bounds, bounds[1:], strict=False))))
    # Column-parallel: two blocks of (8, 3); ranks hold row ranges inside blocks.
    blocks = [[Piece(0, 0, 24)], [Piece(1, 0, 12)], [Piece(1, 12, 24)]]
    while len(blocks) > world_size:
        last = blocks.pop()
        blocks[-1] += last
    while len(blocks) < world_size:
        blocks.append([])
    out.append(MatrixLayout((8, 6), tuple(tuple(b) for b in blocks), split_dim=1, num_blocks=2))
    out.append(row_chunks((1, 4), world_size))
    return out


def fulls(layouts):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(lay.shape, generator=gen) for lay in layouts]


def engine_run(rank, world_size, policy, bucket_numel, active, overlap=True):
    layouts = layouts_for(world_size)
    engine = ShardingEngine(layouts, dist.group.WORLD, policy, bucket_numel, overlap=overlap)
    local = [cut(lay, m)[rank] if a else None for lay, m, a in zip(layouts, fulls(layouts), active,
                                                                     strict=True)]
    out = engine.orthogonalize(local, [FP32] * len(layouts))
    counters = engine.exchange.counters
    return {"out": out, "owners": engine.plan.owners, "buckets": engine.plan.buckets,
            "sent": counters.bytes_sent,
            "received": counters.bytes_received, "calls": counters.calls}


def analytic_bytes(layouts, owners, rank, active, itemsize=4):
    """Gather: ship what I hold of matrices others own; receive the rest of those I own.
    Scatter: the reverse. Nothing is padded, so this is also the minimum."""
    sent = received = 0
    for lay, owner, a in zip(layouts, owners, active, strict=True):
        if not a:
            continue
        mine = lay.local_numel(rank)
        if owner == rank:
            sent += lay.numel - mine
            received += lay.numel - mine
        else:
            sent += mine
            received += mine
    return sent * itemsize, received * itemsize


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("policy", ["round_robin", "balanced"])
@pytest.mark.parametrize("bucket_numel", [1 << 20, 64], ids=["one-round", "many-rounds"])
def test_engine_returns_each_rank_its_shard_of_ns(world_size, policy, bucket_numel):
    active = [True, True, True, False, True, True]  # one matrix sits out this step
    results = run_distributed(engine_run, world_size, policy, bucket_numel, active)
    layouts = layouts_for(world_size)
    for rank, r in enumerate(results):
        for lay, m, a, got in zip(layouts, fulls(layouts), active, r["out"], strict=True):
            if not a:
                assert got is None
                continue
            want = cut(lay, newton_schulz(m, dtype=torch.float32))[rank]
            assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6, rtol=0)
        assert (r["sent"], r["received"]) == analytic_bytes(layouts, r["owners"], rank, active)
    # One all_to_all each way per round that has an active matrix: batched, not per matrix.
    rounds = [b for b in results[0]["buckets"] if any(active[i] for i in b)]
    if policy == "round_robin":  # balanced rounds are levels of equal cost, whatever the bucket
        assert len(rounds) == 1 if bucket_numel > 64 else len(rounds) > 1
    # ... except a round whose owners hold all of their matrices (the (1, 4) matrix lives on
    # rank 0 alone, which owns it: locality): nothing to move, no call.
    owners = results[0]["owners"]
    assert owners[-1] == 0
    moving = [b for b in rounds if any(active[i] and any(
        layouts[i].local_numel(r) for r in range(world_size) if r != owners[i]) for i in b)]
    assert all(r["calls"] == 2 * len(moving) for r in results)
    if bucket_numel == 64 and world_size == 3:  # rounds one after another: the same, bit for bit
        serial = run_distributed(engine_run, world_size, policy, bucket_numel, active, False)
        for r, s in zip(results, serial, strict=True):
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(r["out"], s["out"], strict=True))
            assert (r["sent"], r["received"], r["calls"]) == (s["sent"], s["received"], s["calls"])


def mismatched_run(rank, world_size):
    shapes = [(4, 4), (6, 2)] if rank == 0 else [(4, 4), (2, 6)]
    try:
        ShardingEngine([row_chunks(s, world_size) for s in shapes], dist.group.WORLD)
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_ranks_with_different_matrices_all_refuse_at_startup():
    for message in run_distributed(mismatched_run, 2):
        assert "ranks disagree" in message


def replicated_layouts(world_size: int) -> list[MatrixLayout]:
    """Copies: every rank alone (DDP), and two copies of ``world_size // 2`` shard ranks (HSDP:
    rank r is shard r % S of copy r // S), one with uneven column blocks (2-D)."""
    from marsm_dist.sharding.layout import from_runs, replicated

    s = world_size // 2
    hsdp = MatrixLayout((10, 6), row_chunks((10, 6), s).pieces * 2,
                        replicas=tuple(r // s for r in range(world_size)))
    cols = [((0, 3),), ((3, 7),)]  # column blocks of 3 and 4: uneven
    two_d = from_runs((5, 7), [(((0, 5),), cols[(r % s) % 2]) for r in range(world_size)],
                      [r // s for r in range(world_size)])
    return [replicated((9, 4), world_size), hsdp, two_d, replicated((3, 8), world_size)]


def replicated_run(rank, world_size, policy):
    layouts = replicated_layouts(world_size)
    s = world_size // 2
    # This rank's replica group: the ranks holding its pieces, one per copy.
    groups = {}
    peers = {}
    for shard in range(s):
        peers[shard] = dist.new_group([shard, shard + s])
    everyone = dist.group.WORLD
    groups[tuple(range(world_size))] = ReplicaGroup(everyone, {r: r for r in range(world_size)})
    groups[tuple(r // s for r in range(world_size))] = ReplicaGroup(peers[rank % s], {0: 0, 1: 1})
    engine = ShardingEngine(layouts, everyone, policy, 1 << 20, replica_groups=groups)
    local = [cut(lay, m)[rank] for lay, m in zip(layouts, fulls(layouts), strict=True)]
    out = engine.orthogonalize(local, [FP32] * len(layouts))
    c = engine.exchange.counters
    return {"out": out, "owners": engine.plan.owners, "received": c.bytes_received}


@pytest.mark.parametrize("policy", ["round_robin", "balanced"])
def test_engine_with_copies_sends_each_rank_its_shard_once(policy):
    """DDP- and HSDP-like layouts: every rank gets its pieces of NS, and receives exactly the
    minimum: the rest of the matrices it owns, and its pieces of those it does not."""
    world_size = 4
    results = run_distributed(replicated_run, world_size, policy)
    layouts = replicated_layouts(world_size)
    for rank, r in enumerate(results):
        minimum = 0
        for lay, m, got, owner in zip(layouts, fulls(layouts), r["out"], r["owners"], strict=True):
            want = cut(lay, newton_schulz(m, dtype=torch.float32))[rank]
            assert torch.allclose(got.reshape(-1), want, atol=1e-6, rtol=0)
            mine = lay.local_numel(rank)
            minimum += (lay.numel - mine) if owner == rank else mine
        assert r["received"] == 4 * minimum, (rank, r["received"], minimum)
