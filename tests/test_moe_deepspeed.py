"""Stacked MoE expert tensors under DeepSpeed ZeRO, optimizer from the JSON config: each expert is
its own matrix inside ZeRO's flat partitions (an expert may start mid-partition and span two
ranks), against a single-process MARSM whose experts are separate 2-D parameters. Real forward
and backward: a dense soft mixture of SwiGLU experts (every expert gets a gradient)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

deepspeed = pytest.importorskip("deepspeed")

import marsm_dist.adapters.deepspeed  # noqa: E402,F401  (registers "type": "MARSM")
from marsm_dist import MARSM  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
E, F, D, BATCH, STEPS = 4, 8, 6, 8, 8


class GroupedExperts(nn.Module):
    """Expert weights stacked along dim 0, as torchtitan and HF transformers hold them."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = nn.Parameter(torch.randn(E, F, D, generator=g) * 0.4)
        self.w2 = nn.Parameter(torch.randn(E, D, F, generator=g) * 0.4)
        self.w3 = nn.Parameter(torch.randn(E, F, D, generator=g) * 0.4)


class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)


class TinyMoE(nn.Module):
    def __init__(self, separate: bool = False) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.inp = nn.Linear(D, D)
        self.router = Router()
        experts = GroupedExperts()
        if separate:  # the reference: each expert a 2-D parameter of its own
            self.sep = nn.ParameterDict({f"{n}_{e}": nn.Parameter(p.detach()[e].clone())
                                         for n, p in experts.named_parameters() for e in range(E)})
        else:
            self.experts = experts

    def weights(self, n: str) -> torch.Tensor:
        if hasattr(self, "experts"):
            return getattr(self.experts, n)
        return torch.stack([self.sep[f"{n}_{e}"] for e in range(E)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        gates = torch.softmax(self.router.gate(h), dim=-1)  # (B, E)
        up = torch.einsum("bd,efd->bef", h, self.weights("w1"))
        mid = torch.nn.functional.silu(up) * torch.einsum("bd,efd->bef", h, self.weights("w3"))
        out = torch.einsum("bef,edf->bed", mid, self.weights("w2"))
        return ((torch.einsum("be,bed->bd", gates, out) - y) ** 2).mean() * 20


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + t)
    return torch.randn(BATCH, D, generator=g), torch.randn(BATCH, D, generator=g)


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(("experts", "sep"))}
    for n in ("w1", "w2", "w3"):
        out[n] = model.weights(n).detach().clone()
    return out


def reference() -> tuple[dict[str, torch.Tensor], list[int]]:
    model = TinyMoE(separate=True)
    matrices = [model.inp.weight, *model.sep.values()]
    opt = MARSM([{"params": matrices, "use_marsm": True},
                 {"params": [model.inp.bias, model.router.gate.weight], "use_marsm": False}],
                lr=0.05, ns_dtype=torch.float32)
    clipped = []
    for t in range(STEPS):
        model(*batch(t)).backward()
        opt.step()
        opt.zero_grad()
        clipped.append(opt.last_step_stats.clipped)
    return full(model), clipped


def zero_run(rank: int, world_size: int, stage: int) -> dict:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    cfg = {"train_micro_batch_size_per_gpu": BATCH // world_size, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "optimizer": {"type": "MARSM", "params": {"lr": 0.05, "ns_dtype": "float32"}}}
    model = TinyMoE()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    opt = engine.optimizer.optimizer
    lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
    clipped = []
    for t in range(STEPS):
        x, y = batch(t)
        engine.backward(engine(x[lo:hi], y[lo:hi]))
        engine.step()
        clipped.append(opt.last_step_stats.clipped)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        weights = full(engine.module)
    return {"params": weights, "clipped": clipped,
            "experts": sum(bool(g.get("experts")) for g in opt.param_groups),
            "matrices": sum(len(c.distributor.matrices) for c in opt._step_maps.values())}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_steps_each_stacked_expert_as_its_own_matrix(stage):
    want, clipped = reference()
    assert 0 < sum(clipped) < STEPS * (3 * E + 1), clipped  # the clip fires on some steps only
    for r in run_distributed(zero_run, 2, stage, timeout=150):
        assert r["experts"] == 1  # the JSON route found the stacked experts ...
        assert r["matrices"] == 1 + 3 * E  # ... and ZeRO's flat partitions hold each as a matrix
        # (summed over the plans of the step's calls: ZeRO may step its groups one call each)
        assert r["clipped"] == clipped
        for n, w in want.items():
            assert (r["params"][n].float() - w).abs().max() < 1e-5, (stage, n)
