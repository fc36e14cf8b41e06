"""Stacked expert weights (torchtitan's ``GroupedExperts``: one ``(E, F, D)`` parameter, each
expert its own matrix) move through the neutral checkpoint form like any tensor: saved under
expert parallelism (``Shard(0)`` on an ``ep`` mesh) or EP x expert-FSDP (a 2-D DTensor), loaded
into one process, and the run continues the single-process reference (each expert a separate
matrix) within 1e-6."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from marsm_dist import MARSM, param_groups
from marsm_dist.checkpoint import load_neutral, save_neutral
from tests import test_moe_fsdp2 as moe
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
STOP = moe.STEPS // 2


def _train(model, opt, steps: range) -> None:
    for t in steps:
        full = moe.grads(t)
        for n, p in model.named_parameters():
            g = full[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()


def _sharded(world_size: int, layout: str) -> moe.MoE:
    """The MoE model as tests/test_moe_fsdp2.py shards it: experts ``Shard(0)`` over ``ep`` (and
    ``Shard(1)`` over expert-FSDP for ``ep-efsdp``), dense weights FSDP2 over every rank."""
    model = moe.MoE()
    if layout == "ep":
        mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
        moe._experts_on(model, mesh, [Shard(0)])
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
        moe._experts_on(model, mesh["ep"], [Shard(0)])
        fully_shard(model.experts, mesh=mesh["efsdp"], shard_placement_fn=lambda p: Shard(1))
    dense = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    fully_shard(model.proj, mesh=dense)
    fully_shard(model.router, mesh=dense)
    return model


def _stop(rank: int, world_size: int, path: str, layout: str) -> tuple[dict, dict]:
    model = _sharded(world_size, layout)
    opt = MARSM(param_groups(model), **moe.OPTIONS)
    _train(model, opt, range(STOP))
    manifest = save_neutral(opt, path, model=model)
    return {n: moe.full(p) for n, p in model.named_parameters()}, manifest["params"]


@pytest.mark.parametrize(("layout", "world_size"), [("ep", 2), ("ep-efsdp", 4)])
def test_stacked_experts_move_from_expert_parallel_to_one_process(tmp_path, layout, world_size):
    weights, saved = run_distributed(_stop, world_size, str(tmp_path), layout, timeout=150)[0]
    assert saved["experts.w1_EFD"]["shape"] == [moe.E, moe.F, moe.D]
    assert saved["experts.w1_EFD"]["branch"] == "marsm"
    model = moe.MoE()
    model.load_state_dict(weights)
    opt = MARSM(param_groups(model), **moe.OPTIONS)
    load_neutral(opt, tmp_path, model=model)
    _train(model, opt, range(STOP, moe.STEPS))
    reference = moe.reference()[0]
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), reference[n], atol=1e-6, rtol=0), n
    fresh = moe.MoE()  # the control: the same weights, fresh optimizer state, miss
    fresh.load_state_dict(weights)
    _train(fresh, MARSM(param_groups(fresh), **moe.OPTIONS), range(STOP, moe.STEPS))
    assert max((p.detach() - reference[n]).abs().max() for n, p in fresh.named_parameters()) > 1e-3
