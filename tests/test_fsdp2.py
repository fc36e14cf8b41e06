"""MARSM on FSDP2-sharded models (real fully_shard, real gloo process groups) must reproduce the
single-process optimizer: same trajectory, for every world size, mode and owner policy."""

from __future__ import annotations

import pytest
import torch

from tests import fsdp2_models as fm
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed
STEPS = 10


def sharded_run(rank, world_size, name, approx, kw):
    model = fm.shard(fm.build(name), world_size)
    opt = fm.make_opt(model, approx=approx, **kw)
    fm.train(name, model, opt, STEPS, approx=approx, rank=rank, world_size=world_size)
    stats = opt.last_step_stats
    plan = opt._sharding().engine.plan
    return {"params": fm.full_params(model), "stats": stats, "owners": plan.owners,
            "digest": plan.digest()}


def max_diff(got, want):
    assert got.keys() == want.keys()
    return max((got[n] - want[n]).abs().max().item() for n in got)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("approx", [True, False], ids=["approx", "exact"])
@pytest.mark.parametrize("policy", ["round_robin", "balanced"])
def test_awkward_shapes_match_single_process(world_size, approx, policy):
    kw = dict(ns_dtype=torch.float32, owner_policy=policy)
    results = run_distributed(sharded_run, world_size, "awkward", approx, kw)
    want = fm.reference("awkward", STEPS, approx=approx, ns_dtype=torch.float32)
    for r in results:
        assert max_diff(r["params"], want) < 1e-5
    assert len({r["digest"] for r in results}) == 1 and len({r["owners"] for r in results}) == 1


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("approx", [True, False], ids=["approx", "exact"])
def test_transformer_matches_single_process(world_size, approx):
    kw = dict(ns_dtype=torch.float32)
    results = run_distributed(sharded_run, world_size, "gpt", approx, kw)
    want = fm.reference("gpt", STEPS, approx=approx, ns_dtype=torch.float32)
    assert max_diff(results[0]["params"], want) < 1e-5
