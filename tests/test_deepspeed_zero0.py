"""DeepSpeed ZeRO-0 divides Newton-Schulz over its data-parallel ranks (real DeepSpeed, CPU, gloo).

At stage 0 every rank holds every parameter and DeepSpeed all-reduces the gradients, as torch DDP
does. ``import marsm_dist.adapters.deepspeed`` hands MARSM that group as ``process_group``, for
both ways in (the JSON config's optimizer block and a MARSM object passed as ``optimizer=``): each
matrix is orthogonalized on one rank and broadcast. As in test_topologies.py: within 1e-5 of
single-process MARSM after 10 steps with fp32 Newton-Schulz, the same matrices clipped at each
step (the clip fires on some steps, not all), replicas bitwise identical, and the step's matmul
FLOPs summed over ranks at most 1.15x one process's, with the busiest rank below one process's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

import marsm_dist.adapters.deepspeed  # noqa: E402,F401  (the one import users add)
from marsm_dist import MARSM, param_groups  # noqa: E402
from tests.helpers import fsdp2_models as fm  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
STEPS = 10
NAME = "awkward-sometimes-clipped"  # c_t norms near 1: clipped on some steps, not on others
TIMEOUT = 120.0


def config(world_size: int, stage: int = 0, with_optimizer: bool = True) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": fm.GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 would default to 1.0
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if with_optimizer:
        cfg["optimizer"] = {"type": "MARSM", "params": {"lr": 0.02, "ns_dtype": "float32"}}
    return cfg


def engine_for(rank: int, world_size: int, route: str, stage: int = 0):
    """``route``: "config" (the JSON optimizer block), "bf16" (the same with bf16 on), "client"
    (a MARSM object), or "own-group" (a MARSM object whose process_group the user set)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    model = fm.build(NAME)
    if route in ("config", "bf16"):
        cfg = config(world_size, stage)
        if route == "bf16":
            cfg["bf16"] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        return engine, None
    own = dist.new_group(list(range(world_size))) if route == "own-group" else None
    opt = MARSM(param_groups(model), lr=0.02, ns_dtype=torch.float32, process_group=own)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config(world_size, stage, False))
    return engine, own


def train(step, forward, opt, rank: int, ranks: int) -> tuple[int, list[int]]:
    """STEPS steps on this rank's slice of the global batch: the optimizer step's matmul FLOPs,
    and how many matrices were clipped at each step."""
    lo, hi = rank * fm.GLOBAL_BATCH // ranks, (rank + 1) * fm.GLOBAL_BATCH // ranks
    flops, clipped = 0, []
    for t in range(STEPS):
        x, y = fm.batch(NAME, t)
        forward(x[lo:hi], y[lo:hi])
        with FlopCounterMode(display=False) as counter:
            step()
        flops += counter.get_total_flops()
        clipped.append(opt.last_step_stats.clipped)
    return flops, clipped


def zero0_run(rank: int, world_size: int, route: str) -> dict:
    engine, _ = engine_for(rank, world_size, route)
    opt = engine.basic_optimizer
    # fp32: no wrapper, MARSM sees the parameters; bf16: fp32 copies of each (FP16_UnfusedOptimizer)
    assert engine.optimizer is opt or route == "bf16"
    group = opt.process_group
    flops, clipped = train(engine.step, lambda x, y: engine.backward(engine(x, y)), opt, rank, world_size)
    return {"params": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "flops": flops, "clipped": clipped,
            "is_dp_group": group is engine.seq_data_parallel_group,
            "group_ranks": dist.get_process_group_ranks(group) if group is not None else None}


def reference() -> tuple[dict[str, torch.Tensor], int, list[int]]:
    model = fm.build(NAME)
    opt = fm.make_opt(model, ns_dtype=torch.float32)

    def forward(x, y):
        opt.zero_grad()
        model(x, y).backward()

    flops, clipped = train(opt.step, forward, opt, 0, 1)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, flops, clipped


def check(results: list[dict]) -> None:
    want, single_flops, clipped = reference()
    assert single_flops > 0 and 0 < sum(clipped) < 3 * STEPS, clipped  # the clip fires, not always
    for r in results:
        assert r["clipped"] == clipped
        for n, p in r["params"].items():
            assert (p - want[n]).abs().max().item() < 1e-5, n
    for n, p in results[0]["params"].items():  # replicas bitwise identical
        assert all(torch.equal(p, r["params"][n]) for r in results[1:]), n
    flops = [r["flops"] for r in results]
    assert sum(flops) <= 1.15 * single_flops, (flops, single_flops)
    assert max(flops) < single_flops, (flops, single_flops)


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero0_from_the_json_config_divides_newton_schulz_over_the_data_parallel_ranks(world_size):
    results = run_distributed(zero0_run, world_size, "config", timeout=TIMEOUT)
    assert all(r["is_dp_group"] and r["group_ranks"] == list(range(world_size)) for r in results)
    check(results)


def test_zero0_client_optimizer_divides_newton_schulz_too():
    results = run_distributed(zero0_run, 2, "client", timeout=TIMEOUT)
    assert all(r["is_dp_group"] for r in results)
    check(results)


def kept_run(rank: int, world_size: int) -> tuple[bool, bool]:
    """A group the user set stays theirs; ZeRO-2 (flat partitions with their own group) gets none."""
    engine, own = engine_for(rank, world_size, "own-group")
    zero2, _ = engine_for(rank, world_size, "config", stage=2)
    return engine.basic_optimizer.process_group is own, zero2.basic_optimizer.process_group is None


def test_a_group_the_user_set_is_kept_and_zero_partitions_get_none():
    assert run_distributed(kept_run, 2, timeout=TIMEOUT) == [(True, True), (True, True)]


def test_zero0_bf16_divides_newton_schulz_and_keeps_replicas_identical():
    """bf16 at stage 0: MARSM steps DeepSpeed's fp32 copies of the (still replicated) parameters."""
    results = run_distributed(zero0_run, 2, "bf16", timeout=TIMEOUT)
    assert all(r["is_dp_group"] for r in results)
    _, single_flops, _ = reference()
    for n, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][n]), n
    flops = [r["flops"] for r in results]
    assert sum(flops) <= 1.15 * single_flops and max(flops) < single_flops, (flops, single_flops)
