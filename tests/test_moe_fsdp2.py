"""Mixture-of-experts weights under FSDP2 / DTensor: each expert is its own matrix, orthogonalized
on a rank that holds it.

The model is torchtitan-shaped: a ``GroupedExperts`` module with ``w1_EFD (E, F, D)``,
``w2_EDF (E, D, F)``, ``w3_EFD (E, F, D)`` (torchtitan 0.3's own class cannot be imported on a
CPU machine: its MoE module imports triton), a router and a dense projection. Expert parallelism
is what torchtitan's ``ExpertParallel`` makes of the experts, a ``Shard(0)`` DTensor on the ``ep``
mesh dim, and expert-FSDP is torch's ``fully_shard`` over the other dim with
``shard_placement_fn`` ``Shard(1)`` (real FSDP2: a ``(Shard(1), Shard(0))`` DTensor on the 2-D
mesh). Gradients are given (the same full gradient on every rank, distributed by
``distribute_tensor``), so the reference is exact: a single-process ``MARSM`` in which every expert
is a separate 2-D parameter.

Each run: within 1e-5 of the reference after 8 steps (float32 Newton-Schulz), the clip firing on
some steps only, each expert's owner a rank that holds it, matmul FLOPs summed over ranks at most
1.15x one process's with the busiest rank below one process's, and 0 bytes moved for experts that
a rank holds whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.flop_counter import FlopCounterMode

from marsm_dist import MARSM, param_groups
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
E, F, D = 4, 8, 6
STEPS = 8
OPTIONS = dict(lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)


class GroupedExperts(nn.Module):
    """torchtitan's ``GroupedExperts`` parameters (names and shapes)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w1_EFD = nn.Parameter(torch.randn(E, F, D, generator=g) * 0.3)
        self.w2_EDF = nn.Parameter(torch.randn(E, D, F, generator=g) * 0.3)
        self.w3_EFD = nn.Parameter(torch.randn(E, F, D, generator=g) * 0.3)


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)


class MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.proj = nn.Linear(D, 2 * D)  # a dense matrix and a bias
        self.router = Router()
        self.experts = GroupedExperts()


def grads(step: int) -> dict[str, torch.Tensor]:
    """The full gradient of every parameter at ``step``: scales that make c_t's norm cross 1 on
    some steps and not on others (so a wrong per-expert norm would show)."""
    g = torch.Generator().manual_seed(100 + step)
    scale = 0.5 if step % 3 == 0 else 0.04
    return {n: torch.randn(p.shape, generator=g) * scale for n, p in MoE().named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model: nn.Module, opt: MARSM) -> tuple[int, list[int]]:
    flops, clipped = 0, []
    for t in range(STEPS):
        full_grads = grads(t)
        for n, p in model.named_parameters():
            g = full_grads[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        with FlopCounterMode(display=False) as counter:
            opt.step()
        flops += counter.get_total_flops()
        clipped.append(opt.last_step_stats.clipped)
    return flops, clipped


def reference() -> tuple[dict[str, torch.Tensor], int, list[int]]:
    """One process, each expert a separate 2-D parameter (its own matrix, by construction)."""
    model = MoE()
    dense = [model.proj.weight]
    experts = {n: [nn.Parameter(p.detach()[e].clone()) for e in range(E)]
               for n, p in model.experts.named_parameters()}
    others = [model.proj.bias, model.router.gate.weight]
    opt = MARSM([{"params": dense, "use_marsm": True},
                 {"params": [x for xs in experts.values() for x in xs], "use_marsm": True},
                 {"params": others, "use_marsm": False}], **OPTIONS)
    flops, clipped = 0, []
    for t in range(STEPS):
        full_grads = grads(t)
        for n, p in model.named_parameters():
            if n.startswith("experts."):
                for e, x in enumerate(experts[n.removeprefix("experts.")]):
                    x.grad = full_grads[n][e].clone()
            else:
                p.grad = full_grads[n]
        with FlopCounterMode(display=False) as counter:
            opt.step()
        flops += counter.get_total_flops()
        clipped.append(opt.last_step_stats.clipped)
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("experts.")}
    out.update({f"experts.{n}": torch.stack([x.detach() for x in xs]) for n, xs in experts.items()})
    return out, flops, clipped


def expert_owners(opt: MARSM) -> list[tuple[int, bool]]:
    """Per expert matrix of the job's plan: (owner, whether the owner holds any of it)."""
    distributor = opt._step_map.distributor
    engine = distributor.engine
    out = []
    for e, i in enumerate(distributor.shared):
        spec = distributor.matrices[i]
        if "experts." in spec.name:
            owner = engine.plan.owners[e]
            out.append((owner, spec.layout.local_numel(owner) > 0))
    return out


def result(model: nn.Module, opt: MARSM, trained: tuple[int, list[int]]) -> dict:
    return {"params": {n: full(p) for n, p in model.named_parameters()}, "flops": trained[0],
            "clipped": trained[1], "owners": expert_owners(opt),
            "received": opt.last_step_stats.bytes_received, "sent": opt.last_step_stats.bytes_sent}


def _experts_on(model: MoE, mesh, placements) -> None:
    for n, p in list(model.experts.named_parameters()):
        setattr(model.experts, n, nn.Parameter(distribute_tensor(p.detach(), mesh, placements)))


def ep_run(rank: int, world_size: int, experts_only: bool) -> dict:
    """EP over all ranks (each holds E / W whole experts); dense weights FSDP over the same mesh."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    model = MoE()
    _experts_on(model, mesh, [Shard(0)])
    fully_shard(model.proj, mesh=mesh)
    fully_shard(model.router, mesh=mesh)
    groups = param_groups(model)
    if experts_only:
        groups = [g for g in groups if g.get("experts")]
    opt = MARSM(groups, **OPTIONS)
    return result(model, opt, train(model, opt))


def _optimizer(model: nn.Module, experts_only: bool) -> MARSM:
    groups = param_groups(model)
    return MARSM([g for g in groups if g.get("experts")] if experts_only else groups, **OPTIONS)


def ep_efsdp_run(rank: int, world_size: int, experts_only: bool = False) -> dict:
    """EP 2 x expert-FSDP 2 (torchtitan's layout); dense weights FSDP over all four ranks."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    model = MoE()
    _experts_on(model, mesh["ep"], [Shard(0)])
    fully_shard(model.experts, mesh=mesh["efsdp"], shard_placement_fn=lambda p: Shard(1))
    world = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    fully_shard(model.proj, mesh=world)
    fully_shard(model.router, mesh=world)
    assert isinstance(model.experts.w1_EFD, DTensor) and model.experts.w1_EFD.device_mesh.ndim == 2
    opt = _optimizer(model, experts_only)
    return result(model, opt, train(model, opt))


def crossing_run(rank: int, world_size: int) -> dict:
    """Experts on the ``ep`` dim ({0, 2}, {1, 3}), dense weights FSDP on the ``dp`` dim ({0, 1},
    {2, 3}): rank sets that cross, served over the whole job."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "dp"))
    model = MoE()
    _experts_on(model, mesh["ep"], [Shard(0)])
    fully_shard(model.proj, mesh=mesh["dp"])
    fully_shard(model.router, mesh=mesh["dp"])
    opt = _optimizer(model, False)
    return result(model, opt, train(model, opt))


@pytest.fixture(scope="module")
def single():
    return reference()


def check(results: list[dict], single) -> None:
    ref, ref_flops, ref_clipped = single
    assert 0 < sum(ref_clipped) < STEPS * (3 * E + 1), ref_clipped  # the clip fires on some steps only
    for r in results:
        assert r["clipped"] == ref_clipped
        for n, want in ref.items():
            assert torch.allclose(r["params"][n], want, atol=1e-5, rtol=0), n
        assert r["owners"] and all(holds for _, holds in r["owners"])  # owned where it lives
    flops = [r["flops"] for r in results]
    assert sum(flops) <= 1.15 * ref_flops, (flops, ref_flops)
    assert max(flops) < ref_flops, (flops, ref_flops)


def test_the_reference_differs_from_whole_tensor_semantics(single):
    """Without ``experts=True`` a 3-D tensor keeps the spec's whole-tensor semantics (one clip
    norm and one Newton-Schulz normalization over all experts, scale from (E, F)), which lands
    elsewhere: the checks above could fail."""
    model = MoE()
    groups = [{**g, "experts": False} for g in param_groups(model)]
    opt = MARSM(groups, **OPTIONS)
    for t in range(STEPS):
        for n, p in model.named_parameters():
            p.grad = grads(t)[n]
        opt.step()
    got = model.experts.w1_EFD.detach()
    assert (got - single[0]["experts.w1_EFD"]).abs().max() > 1e-3


def test_experts_group_in_one_process_equals_separate_matrices(single):
    model = MoE()
    opt = MARSM(param_groups(model), **OPTIONS)
    clipped = []
    for t in range(STEPS):
        for n, p in model.named_parameters():
            p.grad = grads(t)[n]
        opt.step()
        clipped.append(opt.last_step_stats.clipped)
    assert clipped == single[2]
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), single[0][n], atol=1e-6, rtol=0), n


def test_expert_parallel_experts_are_orthogonalized_where_they_live(single):
    results = run_distributed(ep_run, 2, False, timeout=120)
    check(results, single)
    only = run_distributed(ep_run, 2, True, timeout=120)
    assert all(r["sent"] == 0 and r["received"] == 0 for r in only)  # EP-local experts move nothing
    assert sorted(o for o, _ in only[0]["owners"]) == [0] * 6 + [1] * 6  # E/W experts x 3 per rank


def test_ep_x_expert_fsdp_gathers_within_each_experts_group(single):
    results = run_distributed(ep_efsdp_run, 4, timeout=150)
    check(results, single)
    # Each expert lives on the two ranks of its ep coordinate (half each); its owner is one of
    # them, so the experts' traffic is the other half of each expert, in (gather) and out
    # (scatter), float32: 3 E experts x F D / 2 elements x 4 bytes x 2, and nothing elsewhere.
    only = run_distributed(ep_efsdp_run, 4, True, timeout=150)
    want = 3 * E * (F * D // 2) * 4 * 2
    assert sum(r["received"] for r in only) == want and sum(r["sent"] for r in only) == want
    owned = [o for o, _ in only[0]["owners"]]
    assert sorted(owned.count(r) for r in range(4)) == [3, 3, 3, 3]  # E x 3 experts, balanced


def test_expert_and_dense_weights_on_crossing_rank_sets(single):
    results = run_distributed(crossing_run, 4, timeout=150)
    check(results, single)  # (its FLOPs bound: the dp copies of an expert split, not repeat, its NS)
