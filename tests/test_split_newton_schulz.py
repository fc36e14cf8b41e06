"""Newton-Schulz of one matrix split by columns over a team of gloo ranks, against the plain form."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from marsm_dist.newton_schulz import newton_schulz
from marsm_dist.sharding.split_newton_schulz import split_newton_schulz
from tests.helpers.distributed import run_distributed


def full_matrix(shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def split_run(rank, world, shape, widths, dtype_name):
    """This rank's columns of the wide orientation (widths may be uneven, or zero)."""
    dtype = getattr(torch, dtype_name)
    X = full_matrix(shape)
    X = X.mT if X.shape[0] > X.shape[1] else X
    lo = sum(widths[:rank])
    return split_newton_schulz(X[:, lo:lo + widths[rank]], dist.group.WORLD, dtype=dtype)


@pytest.mark.parametrize("shape,widths", [((24, 60), [30, 30]), ((90, 20), [50, 40]), ((16, 40), [0, 40]),
                                          ((12, 30), [7, 11, 12])])
def test_split_matches_the_plain_form(shape, widths):
    world = len(widths)
    ref = newton_schulz(full_matrix(shape), dtype=torch.float64, form="plain")
    ref = ref.mT if shape[0] > shape[1] else ref
    for dtype, tol in (("float64", 1e-12), ("float32", 2e-5)):
        blocks = run_distributed(split_run, world, shape, widths, dtype)
        got = torch.cat(blocks, dim=1)
        assert got.dtype == getattr(torch, dtype) and got.shape == ref.shape
        assert (got.double() - ref).abs().max() < tol, dtype
    # bf16: within bf16 noise of float64, as close as the plain bf16 form is.
    got = torch.cat(run_distributed(split_run, world, shape, widths, "bfloat16"), dim=1).double()
    plain = newton_schulz(full_matrix(shape), dtype=torch.bfloat16, form="plain").double()
    plain = plain.mT if shape[0] > shape[1] else plain
    err, err_plain = ((x - ref).norm() / ref.norm() for x in (got, plain))
    assert err < 2 * err_plain + 1e-3, (err, err_plain)


def test_a_team_of_one_is_the_plain_form():
    X = full_matrix((20, 50))
    for dtype in (torch.float32, torch.bfloat16):
        got = split_newton_schulz(X, None, dtype=dtype)
        assert torch.allclose(got.double(), newton_schulz(X, dtype=dtype, form="plain").double(),
                              atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)


def engine_run(rank, world, shapes, max_team, replicated_too):
    from marsm_dist.newton_schulz import NS_COEFFICIENTS
    from marsm_dist.orthogonalize import NSConfig
    from marsm_dist.sharding import ShardingEngine, cut, row_chunks
    from marsm_dist.sharding.layout import replicated

    layouts = [row_chunks(s, world) for s in shapes]
    if replicated_too:
        layouts[-1] = replicated(shapes[-1], world)
    gen = torch.Generator().manual_seed(5)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    from marsm_dist.sharding.exchange import ReplicaGroup

    groups = {layouts[-1].replicas: ReplicaGroup(dist.group.WORLD, {r: r for r in range(world)})} \
        if replicated_too else None  # every rank is a copy of its own: the job group is the replica group
    engine = ShardingEngine(layouts, dist.group.WORLD, max_team=max_team, replica_groups=groups)
    local = [cut(lay, m)[rank] for lay, m in zip(layouts, fulls, strict=True)]
    out = engine.orthogonalize(local, [NSConfig(5, torch.float32, NS_COEFFICIENTS)] * len(shapes))
    return {"out": out, "teams": engine.plan.teams, "owners": engine.plan.owners}


@pytest.mark.parametrize("replicated_too", [False, True], ids=["fsdp", "with-a-ddp-matrix"])
def test_engine_teams_split_idle_ranks_and_match_the_plain_form(replicated_too):
    """Two matrices on four ranks: whole-matrix ownership leaves two idle; with teams of two each
    matrix is split over two ranks, and every rank still gets NS of its shard."""
    from marsm_dist.sharding import cut, row_chunks
    from marsm_dist.sharding.layout import replicated

    shapes = [(24, 96), (96, 24)]
    world = 4
    res = run_distributed(engine_run, world, shapes, 2, replicated_too)
    teams = res[0]["teams"]
    assert sorted(len(t) for t in teams) == [2, 2] and len({r for t in teams for r in t}) == 4
    gen = torch.Generator().manual_seed(5)
    fulls = [torch.randn(s, generator=gen) for s in shapes]
    for k, s in enumerate(shapes):
        lay = replicated(s, world) if replicated_too and k == 1 else row_chunks(s, world)
        want = cut(lay, newton_schulz(fulls[k], dtype=torch.float32, form="plain"))
        for rank in range(world):
            got = res[rank]["out"][k]
            assert torch.allclose(got, want[rank].reshape(-1), atol=1e-5, rtol=0), (k, rank)
    solo = run_distributed(engine_run, world, shapes, 1, replicated_too)
    assert solo[0]["teams"] == ()
