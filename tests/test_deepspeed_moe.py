"""DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``, expert parallelism over gloo) under ZeRO-2,
optimizer from the JSON config: each global expert matrix is orthogonalized once in the whole job,
by a rank that holds it, and training follows a single-process MARSM whose experts are separate
2-D parameters (the same top-1 routing, written out in plain torch).

6 experts of 3 matrices (a 3-layer MLP), EP 2: each EP rank holds 3 local experts. On 4 ranks (EP 2
x expert-DP 2) ZeRO cuts each EP rank's MARS-M moe buffer (3 x 160 elements) in two at element 240,
inside the middle matrix of its local expert 1: that global expert's matrix is split over two ranks.
On 2 ranks (EP 2, expert-DP 1) every rank holds its experts whole.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

from deepspeed.moe.layer import MoE  # noqa: E402
from deepspeed.utils import groups as ds_groups  # noqa: E402

import marsm_dist.adapters.deepspeed  # noqa: E402,F401  (registers "type": "MARSM")

try:  # Megatron's adapter too, when installed: its expert mark (allreduce=False) is DeepSpeed's as
    # well, and it must not claim DeepSpeed's experts (it did, in one process with both imported).
    import marsm_dist.adapters.megatron  # noqa: E402,F401
except ImportError:
    pass
from marsm_dist import MARSM  # noqa: E402
from marsm_dist.adapters.deepspeed_moe import moe_flat_slots  # noqa: E402
from marsm_dist.sharding.experts import per_expert  # noqa: E402
from marsm_dist.sharding.layout import Piece  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
D, FF, E, EP, TOKENS, STEPS, LR, SCALE = 6, 8, 6, 2, 24, 8, 0.05, 20.0
SHAPES = {"fc1.weight": (FF, D), "fc1.bias": (FF,), "mid.weight": (FF, FF), "mid.bias": (FF,),
          "fc2.weight": (D, FF), "fc2.bias": (D,)}
MATRICES = [n for n, shape in SHAPES.items() if len(shape) == 2]


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.mid(F.gelu(self.fc1(x)))))


def initial() -> dict[str, torch.Tensor]:
    """Every weight of the job, experts by global index."""
    g = torch.Generator().manual_seed(6)
    w = {"inp.weight": torch.randn(D, D, generator=g) * 0.5, "inp.bias": torch.randn(D, generator=g) * 0.1,
         "gate": torch.randn(E, D, generator=g)}
    for e in range(E):
        for n, shape in SHAPES.items():
            w[f"{e}.{n}"] = torch.randn(*shape, generator=g) * 0.4
    return w


class DSNet(nn.Module):
    """A dense layer, then DeepSpeed's MoE (top-1, no token dropped, no noise, no residual)."""

    def __init__(self, ep_rank: int) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, Expert(), num_experts=E, ep_size=EP, k=1, capacity_factor=float(E), min_capacity=0,
                       noisy_gate_policy=None, drop_tokens=False, use_rts=False, use_residual=False)
        w, local = initial(), E // EP
        with torch.no_grad():
            self.inp.weight.copy_(w["inp.weight"])
            self.inp.bias.copy_(w["inp.bias"])
            self.moe.deepspeed_moe.gate.wg.weight.copy_(w["gate"])
            for j, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                for n, p in expert.named_parameters():  # local expert j = global ep_rank * local + j
                    p.copy_(w[f"{ep_rank * local + j}.{n}"])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out, _aux, _counts = self.moe(self.inp(x))  # l_aux left out, as in the reference
        return ((out - y) ** 2).mean() * SCALE


class RefNet(nn.Module):
    """The same math in one process: each expert its own module (2-D weights)."""

    def __init__(self) -> None:
        super().__init__()
        w = initial()
        self.inp = nn.Linear(D, D)
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(w[n.removeprefix("experts.") if n.startswith("experts.") else
                          "gate" if n == "gate.weight" else n])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        gates = torch.softmax(self.gate(h), dim=1)
        pick = gates.argmax(dim=1)
        outs = torch.stack([expert(h) for expert in self.experts])  # (E, S, D): only picked rows count
        out = gates.gather(1, pick[:, None]) * outs[pick, torch.arange(len(h))]
        return ((out - y) ** 2).mean() * SCALE


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(TOKENS, D, generator=g), torch.randn(TOKENS, D, generator=g)


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reference() -> dict:
    model = RefNet()
    matrices = [model.inp.weight] + [p for e in model.experts for p in e.parameters() if p.dim() == 2]
    rest = [model.inp.bias, model.gate.weight]
    rest += [p for e in model.experts for p in e.parameters() if p.dim() < 2]
    opt = MARSM([{"params": matrices, "use_marsm": True}, {"params": rest, "use_marsm": False}],
                lr=LR, ns_dtype=torch.float32)
    clipped, flops, picks = [], [], []
    for t in range(STEPS):
        x, y = batch(t)
        model(x, y).backward()
        flops.append(matmul_flops(opt.step))
        opt.zero_grad()
        clipped.append(opt.last_step_stats.clipped)
        with torch.no_grad():
            picks.append(torch.softmax(model.gate(model.inp(x)), 1).topk(2, dim=1).values)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"weights": weights, "clipped": clipped, "flops": flops, "picks": picks}


def ds_weights(engine, ep_rank: int) -> dict[str, torch.Tensor]:
    """This rank's weights under the reference's names (its experts by global index)."""
    m, local = engine.module, E // EP
    out = {"inp.weight": m.inp.weight, "inp.bias": m.inp.bias,
           "gate.weight": m.moe.deepspeed_moe.gate.wg.weight}
    for j, expert in enumerate(m.moe.deepspeed_moe.experts.deepspeed_experts):
        out.update({f"experts.{ep_rank * local + j}.{n}": p for n, p in expert.named_parameters()})
    return {n: p.detach().clone().float() for n, p in out.items()}


def plan_of(opt: MARSM) -> list[tuple[str, int, tuple[int, ...], int]]:
    """(name, owner, ranks holding pieces, ranks planned over) of every matrix the step's calls plan."""
    out = []
    for ctx in opt._step_maps.values():
        d = ctx.distributor
        for k, i in enumerate(d.shared):
            lay = d.matrices[i].layout
            holders = tuple(r for r in range(d.world_size) if lay.local_numel(r))
            out.append((d.matrices[i].name, d.engine.plan.owners[k], holders, d.world_size))
    return out


def ds_run(rank: int, world: int, stage: int, bf16: bool) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg = {"train_micro_batch_size_per_gpu": TOKENS // world, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "optimizer": {"type": "MARSM", "params": {"lr": LR, "ns_dtype": "float32"}}}
    if bf16:  # ZeRO-1 with bf16 weights and fp32 gradients: DeepSpeed's BF16_Optimizer, one step call
        cfg.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    ep_rank = rank % EP  # DeepSpeed's expert-parallel groups: consecutive ranks (checked below)
    model = DSNet(ep_rank)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert ds_groups._get_expert_parallel_rank(f"ep_size_{EP}") == ep_rank
    opt = engine.optimizer.optimizer
    lo, hi = rank * TOKENS // world, (rank + 1) * TOKENS // world
    clipped, flops, ns_flops = [], [], []
    for t in range(STEPS):
        x, y = (v[lo:hi].to(torch.bfloat16 if bf16 else torch.float32) for v in batch(t))
        engine.backward(engine(x, y))
        flops.append(matmul_flops(engine.step))
        clipped.append(opt.last_step_stats.clipped)
        ns_flops.append(opt.last_step_stats.ns_flops_this_rank)
    return {"weights": ds_weights(engine, ep_rank), "clipped": clipped, "flops": flops,
            "ns_flops": ns_flops, "plan": plan_of(opt), "wrapper": type(engine.optimizer).__name__,
            "experts_groups": sum(bool(g.get("experts")) for g in opt.param_groups)}


def _check_weights(results: list[dict], want: dict, tol: float) -> None:
    got = {}
    for r in results:
        for n, w in r["weights"].items():
            if n in got:  # copies (dense weights everywhere, an expert on its EDP ranks) agree
                assert torch.equal(got[n], w), n
            got.setdefault(n, w)
    assert sorted(got) == sorted(want["weights"])
    for n, w in want["weights"].items():
        assert (got[n] - w).abs().max() < tol, n


def _check_plan(results: list[dict], world: int) -> None:
    plan = results[0]["plan"]
    assert all(r["plan"] == plan for r in results)  # one plan, over the whole job
    assert all(planned == world for *_, planned in plan), plan
    experts = [p for p in plan if "deepspeed_experts" in p[0]]
    assert len(experts) == len({p[0] for p in experts}) == len(MATRICES) * E  # each global matrix once
    assert (world == EP) != any(len(holders) > 1 for *_, holders, _ in experts)  # ZeRO cut some (EDP 2)
    assert all(owner in holders for _, owner, holders, _ in experts), experts  # owned where it lies


def _check_flops(results: list[dict], want: dict) -> None:
    """Newton-Schulz's matmuls: each matrix once in the job, spread so no rank does it all."""
    total = [sum(step) for step in zip(*(r["flops"] for r in results), strict=True)]
    busiest = [max(step) for step in zip(*(r["flops"] for r in results), strict=True)]
    for t in range(STEPS):
        assert total[t] <= 1.15 * want["flops"][t], (t, total[t], want["flops"][t])
        assert busiest[t] < want["flops"][t]
        assert sum(r["ns_flops"][t] for r in results) <= 1.15 * want["flops"][t]


@pytest.fixture(scope="module")
def want() -> dict:
    out = reference()
    margins = torch.cat([p[:, 0] - p[:, 1] for p in out["picks"]])
    assert margins.min() > 1e-3  # no token sits on a routing tie that rounding could flip
    # the clip fires on some steps and matrices only
    assert 0 < sum(out["clipped"]) < STEPS * (1 + len(MATRICES) * E), out["clipped"]
    return out


@pytest.mark.parametrize("world", [4, 2])
def test_deepspeed_moe_zero2_orthogonalizes_each_global_expert_once(world, want):
    results = run_distributed(ds_run, world, 2, False, timeout=90)
    _check_weights(results, want, 1e-5)
    for r in results:
        assert r["experts_groups"] == 1
        assert r["clipped"] == want["clipped"]  # every global expert counted once, on every rank
    _check_plan(results, world)
    _check_flops(results, want)


def test_deepspeed_moe_bf16_zero1_steps_all_groups_in_one_call(want):
    """DeepSpeed's BF16_Optimizer steps the dense and the moe groups in one MARSM call: the experts
    must be described over the dense group, or the call's matrices would span two meshes."""
    results = run_distributed(ds_run, 4, 1, True, timeout=90)
    assert {r["wrapper"] for r in results} == {"BF16_Optimizer"}
    _check_weights(results, want, 0.05)  # bf16 weights: the reference's path, to bf16's precision
    assert all(r["clipped"] == results[0]["clipped"] for r in results)
    _check_plan(results, 4)
    _check_flops(results, want)


def test_moe_slots_describe_each_global_expert():
    """The layout alone: EP 2 x EDP 2, a 2-parameter group whose partitions cut the second."""
    params = [torch.empty(3, 4), torch.empty(2, 5)]  # flat [0, 12) and [12, 22); partitions of 11
    coords = [(0, 0), (1, 0), (0, 1), (1, 1)]  # dense rank -> (EP rank, EDP rank)
    for me in range(4):
        slots = moe_flat_slots(params, [0, 12], 11, coords, me, {})
        assert [s.shape for s in slots] == [(2, 3, 4), (2, 2, 5)]
        assert [(s.offset, s.numel) for s in slots] == ([(0, 11), (0, 0)] if me < 2 else [(0, 1), (1, 10)])
    second = moe_flat_slots(params, [0, 12], 11, coords, 0, {})[1].layout
    assert second.pieces == ((), (), (Piece(0, 0, 10),), (Piece(0, 10, 20),))
    first = per_expert(moe_flat_slots(params, [0, 12], 11, coords, 0, {})[0].layout)
    # global expert row e lies on the ranks of EP rank e: [0, 11) on EDP 0 and [11, 12) on EDP 1
    assert first[0][0].pieces == ((Piece(0, 0, 11),), (), (Piece(0, 11, 12),), ())
    assert first[1][0].pieces == ((), (Piece(0, 0, 11),), (), (Piece(0, 11, 12),))
    assert first[1][0].preferred_owners == (1, 3)


def ckpt_run(rank: int, world: int, path: str) -> tuple[dict, dict]:
    """ZeRO-2 MoE: save after half the steps, keep going (the uninterrupted run), then a fresh
    engine loads the checkpoint and runs the second half again."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg = {"train_micro_batch_size_per_gpu": TOKENS // world, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9,
           "optimizer": {"type": "MARSM", "params": {"lr": LR, "ns_dtype": "float32"}}}
    ep_rank, lo, hi = rank % EP, rank * TOKENS // world, (rank + 1) * TOKENS // world

    def steps(engine, first: int) -> None:
        for t in range(first, first + STEPS // 2):
            x, y = (v[lo:hi] for v in batch(t))
            engine.backward(engine(x, y))
            engine.step()

    model = DSNet(ep_rank)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    steps(engine, 0)
    engine.save_checkpoint(path, tag="half")
    steps(engine, STEPS // 2)
    uninterrupted = ds_weights(engine, ep_rank)
    model = DSNet(ep_rank)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # elsewhere: the weights and the optimizer state must come from the checkpoint
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    engine.load_checkpoint(path, tag="half")
    steps(engine, STEPS // 2)
    return uninterrupted, ds_weights(engine, ep_rank)


def test_deepspeed_moe_zero2_checkpoint_resumes_the_same_trajectory(tmp_path):
    for uninterrupted, resumed in run_distributed(ckpt_run, 4, str(tmp_path), timeout=180):
        for n, w in uninterrupted.items():
            assert torch.equal(resumed[n], w), n
