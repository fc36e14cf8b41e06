"""Each matrix is orthogonalized once in the whole job, on every topology: replicated data
parallel (torch DDP with ``process_group=``), HSDP (a (replicate, shard) mesh) and FSDP x TP
(2-D DTensors from torch's tensor-parallel styles, then ``fully_shard``; uneven blocks).

Each run must land within 1e-5 of the single-process optimizer after 10 steps, clipping the same
matrices at each step (c_t norms near 1: the clip fires on some steps and not on others, so a
wrong norm shows; a clip on every step would hide it, as NS undoes a constant factor), with fp32
Newton-Schulz; leave its replicas bitwise identical, and run at most 1.15x a single
process's Newton-Schulz FLOPs summed over ranks (torch's FlopCounterMode counts the matmuls of the
step), with the busiest rank below one process's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
STEPS = 10
NAME = "awkward-sometimes-clipped"  # uneven shapes, a matrix with fewer rows than ranks


def train(model, opt, rank: int, ranks: int) -> tuple[int, list[int]]:
    """STEPS steps on this data-parallel rank's slice of the global batch: the step's FLOPs, and
    how many matrices were clipped at each step."""
    lo, hi = rank * fm.GLOBAL_BATCH // ranks, (rank + 1) * fm.GLOBAL_BATCH // ranks
    flops, clipped = 0, []
    for t in range(STEPS):
        x, y = fm.batch(NAME, t)
        model(x[lo:hi], y[lo:hi]).backward()
        with FlopCounterMode(display=False) as counter:
            opt.step()
        flops += counter.get_total_flops()
        clipped.append(opt.last_step_stats.clipped)
        opt.zero_grad()
    return flops, clipped


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def result(model, opt, trained: tuple[int, list[int]]) -> dict:
    named = dict(model.named_parameters())
    return {"params": {n.removeprefix("module."): full(p) for n, p in named.items()},
            "local": {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                      for n, p in named.items()},
            "flops": trained[0], "clipped": trained[1],
            "received": opt.last_step_stats.bytes_received}


def ddp_run(rank, world_size):
    model = fm.build(NAME)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = fm.make_opt(model, ns_dtype=torch.float32, process_group=dist.group.WORLD)
    return result(model, opt, train(ddp, opt, rank, world_size))


def hsdp_run(rank, world_size):
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    model = fm.build(NAME)
    for m in (model.a, model.b, model.c, model):
        fully_shard(m, mesh=mesh)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    return result(model, opt, train(model, opt, rank, world_size))


def fsdp_tp_run(rank, world_size):
    model, dp_rank, dp_size = fm.shard_fsdp_x_tp(fm.build(NAME))
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    return {**result(model, opt, train(model, opt, dp_rank, dp_size)), "placements": placements}


def reference() -> tuple[dict[str, torch.Tensor], int, list[int]]:
    model = fm.build(NAME)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    flops, clipped = train(model, opt, 0, 1)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, flops, clipped


def check(results: list[dict], copies: list[list[int]], flops_allowance: float = 1.15) -> None:
    want, single_flops, clipped = reference()
    assert single_flops > 0 and 0 < sum(clipped) < 3 * STEPS  # the clip fires, not always
    for r in results:
        assert r["clipped"] == clipped
        for n, p in r["params"].items():
            assert (p - want[n]).abs().max().item() < 1e-5, n
    for ranks in copies:  # ranks holding the same pieces hold bitwise the same values
        for n, t in results[ranks[0]]["local"].items():
            assert all(torch.equal(t, results[r]["local"][n]) for r in ranks[1:]), (n, ranks)
    flops = [r["flops"] for r in results]
    assert sum(flops) <= flops_allowance * single_flops, (flops, single_flops)
    assert max(flops) < single_flops, (flops, single_flops)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_orthogonalizes_each_matrix_once(world_size):
    results = run_distributed(ddp_run, world_size)
    check(results, [list(range(world_size))])
    # Each rank receives the matrices it does not own (fp32 results), and nothing else.
    assert all(r["received"] > 0 for r in results)


def test_hsdp_orthogonalizes_each_matrix_once_over_both_dims():
    results = run_distributed(hsdp_run, 4)
    check(results, [[0, 2], [1, 3]])  # mesh [[0, 1], [2, 3]]: rank r and r + 2 are replicas


def test_fsdp_x_tp_with_uneven_blocks():
    results = run_distributed(fsdp_tp_run, 4)
    placements = results[0]["placements"]
    assert "_StridedShard" in placements["a.weight"] and "Shard(dim=1)" in placements["b.weight"]
    check(results, [])


def mixed_mesh_run(rank, world_size):
    """FSDP x TP where a matrix is left out of the TP plan: ``c`` lives on the dp sub-mesh only
    (a copy per tp coordinate) beside 2-D matrices; it is lifted to the 2-D mesh, so it too is
    orthogonalized once in the job."""
    model = fm.build(NAME)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(output_layouts=Replicate()),
                                           "b": RowwiseParallel(input_layouts=Replicate())})
    for m in (model.a, model.b, model.c, model):
        fully_shard(m, mesh=mesh["dp"])
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    dp = mesh.get_local_rank("dp")
    return {**result(model, opt, train(model, opt, dp, 2)),
            "c": str(model.c.weight.placements), "c_mesh": model.c.weight.device_mesh.ndim}


def test_a_matrix_left_out_of_the_tp_plan_is_lifted_to_the_2d_mesh():
    results = run_distributed(mixed_mesh_run, 4)
    assert results[0]["c_mesh"] == 1 and results[0]["c"] == "(Shard(dim=0),)"
    check(results, [])
    for r, peer in ((0, 1), (2, 3)):  # mesh [[0, 1], [2, 3]]: tp peers hold the same rows of c
        assert torch.equal(results[r]["local"]["c.weight"], results[peer]["local"]["c.weight"])


def pp_mixed_mesh_run(rank, world_size):
    """The same on one pipeline stage of a (pp, dp, tp) mesh: each stage's MARSM sees only its
    stage's ranks, so ``c`` is lifted to the stage's (dp, tp) slice, not to the root mesh (which
    spans both stages). Both stages train the same model here, so each must match the reference."""
    model = fm.build(NAME)
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "dp", "tp"))
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(output_layouts=Replicate()),
                                           "b": RowwiseParallel(input_layouts=Replicate())})
    for m in (model.a, model.b, model.c, model):
        fully_shard(m, mesh=mesh["dp"])
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    return result(model, opt, train(model, opt, 0, 1))


def test_a_matrix_left_out_of_the_tp_plan_is_lifted_to_its_pipeline_stage():
    results = run_distributed(pp_mixed_mesh_run, 4)
    check(results[:2], [])
    check(results[2:], [])


def hsdp_x_tp_run(rank, world_size, c_on_tp: bool):
    """HSDP x TP, torchtitan's (dp_replicate, dp_shard, tp) mesh: ``b``'s bias, replicated by the
    TP plan, is Replicate() on two mesh dims. ``c`` is a copy per (replicate, tp) coordinate, 4
    copies with one owner in the job: replicated over tp by ``distribute_module`` (Replicate() on
    two dims of the 3-D mesh), or left out of the TP plan (on the dp mesh, lifted to the 3-D one)."""
    model = fm.build(NAME)
    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("replicate", "shard", "tp"))
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(output_layouts=Replicate()),
                                           "b": RowwiseParallel(input_layouts=Replicate())})
    if c_on_tp:  # plain tensors in and out, replicated weight inside
        distribute_module(model.c, mesh["tp"],
                          input_fn=lambda mod, inputs, tp: tuple(DTensor.from_local(x, tp, [Replicate()])
                                                                 for x in inputs),
                          output_fn=lambda mod, out, tp: out.to_local())
    for m in (model.a, model.b, model.c, model):
        fully_shard(m, mesh=mesh["replicate", "shard"])
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    out = result(model, opt, train(model, opt, mesh.get_local_rank("replicate"), 2))
    return {**out, "placements": {n: str(p.placements) for n, p in model.named_parameters()},
            "c_mesh": model.c.weight.device_mesh.ndim,
            "owned": opt.last_step_stats.owned_matrices, "sharded": opt.last_step_stats.sharded_matrices}


@pytest.mark.parametrize("c_on_tp", [True, False], ids=["c-replicated-over-tp", "c-left-out-of-tp"])
def test_hsdp_x_tp_with_weights_replicated_on_two_mesh_dims(c_on_tp):
    results = run_distributed(hsdp_x_tp_run, 4, c_on_tp)
    assert results[0]["placements"]["b.bias"].count("Replicate()") == 2
    assert results[0]["c_mesh"] == (3 if c_on_tp else 2)
    if c_on_tp:
        assert results[0]["placements"]["c.weight"].count("Replicate()") == 2
    # mesh [[[0, 1]], [[2, 3]]]: ranks r and r + 2 are HSDP replicas; all four hold all of c.
    check(results, [[0, 2], [1, 3]])
    assert all(torch.equal(results[0]["local"]["c.weight"], r["local"]["c.weight"]) for r in results)
    assert sum(r["owned"] for r in results) == results[0]["sharded"] == 3  # a, b, c: one owner each


def ddp_team_run(rank, world_size):
    model = fm.build(NAME)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = fm.make_opt(model, ns_dtype=torch.float32, process_group=dist.group.WORLD, ns_team_max=4)
    out = result(model, opt, train(ddp, opt, rank, world_size))
    return {**out, "teams": opt._step_map.distributor.engine.plan.teams}


def test_idle_ranks_split_the_largest_matrix_and_change_nothing():
    """DDP at 4 ranks with fewer matrices than ranks: with ``ns_team_max=4`` the idle ranks split
    the busiest owner's matrix by columns; the trajectory is the single process's all the same."""
    results = run_distributed(ddp_team_run, 4)
    assert any(len(t) > 1 for t in results[0]["teams"])
    # Each member of a team repeats the m^3 product of the split (S^2), so the sum grows a little.
    check(results, [list(range(4))], flops_allowance=1.25)
    alone = run_distributed(ddp_run, 4)  # whole-matrix ownership: the busiest rank does more
    assert max(r["flops"] for r in results) < 0.75 * max(r["flops"] for r in alone)
