"""No half-done step: nothing can fail after a step's first write.

- A param group none of whose parameters got a gradient (frozen layers kept in their own group,
  experts that got no tokens, a branch not taken) does nothing and raises nothing, and the rest
  of the step is the single process's, under FSDP2, DDP, DeepSpeed ZeRO 0-3 and Megatron.
  Before, a sharded or replicated frozen group crashed the step *after* the live groups'
  parameters were written and before their step counters were: ``RuntimeError: Tensor list must
  have at least one tensor`` from ``torch._foreach_add_``.
- A sharded matrix whose local part no longer matches its plan (resized in place after the
  optimizer planned) is refused before anything is written, on every rank; the exchange used to
  find it halfway through the step, after the AdamW branch had stepped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from marsm_dist import MARSM
from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
STEPS = 3
NAME = "awkward"


def frozen_groups(model) -> list[dict]:
    """Live matrices, the frozen ``c`` alone, and the AdamW branch (``c`` is frozen first)."""
    named = dict(model.named_parameters())
    live = [p for n, p in named.items() if p.ndim == 2 and n.split(".")[0] in ("a", "b")]
    rest = [p for n, p in named.items() if p.ndim != 2 or n.split(".")[0] in ("emb", "head")]
    return [{"params": live, "use_marsm": True}, {"params": [named["c.weight"]], "use_marsm": True},
            {"params": rest, "use_marsm": False}]


def freeze(model):
    model.c.weight.requires_grad_(False)
    return model


def train(model, opt, rank: int, world: int, step=None) -> None:
    lo, hi = rank * fm.GLOBAL_BATCH // world, (rank + 1) * fm.GLOBAL_BATCH // world
    for t in range(STEPS):
        x, y = fm.batch(NAME, t)
        loss = model(x[lo:hi], y[lo:hi])
        if step is None:
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            step(loss)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().float()


def reference() -> dict[str, torch.Tensor]:
    model = freeze(fm.build(NAME))
    opt = MARSM(frozen_groups(model), lr=0.02, ns_dtype=torch.float32)
    train(model, opt, 0, 1)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def counters(opt: MARSM, params) -> list[float]:
    out = []
    for p in params:
        step = opt.state[p].get("step") if p in opt.state else None
        out.append(0.0 if step is None else float(full(step)))
    return out


def fsdp2_run(rank, world_size):
    model = freeze(fm.build(NAME))
    fm.shard(model, world_size)
    opt = MARSM(frozen_groups(model), lr=0.02, ns_dtype=torch.float32)
    train(model, opt, rank, world_size)
    return ({n.removeprefix("module."): full(p) for n, p in model.named_parameters()},
            counters(opt, [model.a.weight, model.c.weight]))


def ddp_run(rank, world_size):
    model = freeze(fm.build(NAME))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = MARSM(frozen_groups(model), lr=0.02, ns_dtype=torch.float32, process_group=dist.group.WORLD)
    train(ddp, opt, rank, world_size)
    return ({n: full(p) for n, p in model.named_parameters()},
            counters(opt, [model.a.weight, model.c.weight]))


def deepspeed_run(rank, world_size, stage):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import marsm_dist.adapters.deepspeed  # noqa: F401

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    model = freeze(fm.build(NAME))
    cfg = {"train_micro_batch_size_per_gpu": fm.GLOBAL_BATCH // world_size, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
           "optimizer": {"type": "MARSM", "params": {"lr": 0.02, "ns_dtype": "float32"}}}
    groups = frozen_groups(model)
    if stage in (1, 2):  # DeepSpeed's own ZeRO-1/2 fails on a group of frozen parameters only
        groups = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}, groups[2]]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)

    def step(loss):
        engine.backward(loss)
        engine.step()

    train(engine, None, rank, world_size, step)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: full(p) for n, p in engine.module.named_parameters()}, None


def check(results, want) -> None:
    for got, steps in results:
        for n, p in want.items():
            assert (got[n] - p).abs().max().item() < 1e-5, n
        assert torch.equal(got["c.weight"], fm.build(NAME).c.weight.detach())  # frozen: untouched
        if steps is not None:
            assert steps == [STEPS, 0.0], steps  # live counted every step, frozen never


@pytest.fixture(scope="module")
def want():
    return reference()


def test_fsdp2_frozen_group(want):
    check(run_distributed(fsdp2_run, 2), want)


def test_ddp_frozen_group(want):
    check(run_distributed(ddp_run, 2), want)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_frozen_group(want, stage):
    pytest.importorskip("deepspeed")
    check(run_distributed(deepspeed_run, 2, stage), want)


def no_gradient_run(rank, world_size):
    """A whole step with no gradient anywhere does nothing: no error, no change."""
    model = fm.build(NAME)
    fm.shard(model, world_size)
    opt = MARSM(frozen_groups(model), lr=0.02)
    before = {n: full(p) for n, p in model.named_parameters()}
    opt.step()
    after = {n: full(p) for n, p in model.named_parameters()}
    return all(torch.equal(before[n], after[n]) for n in before), counters(opt, [model.a.weight])


def test_a_step_without_any_gradient_does_nothing():
    assert run_distributed(no_gradient_run, 2) == [(True, [0.0])] * 2


def megatron_run(rank, world_size, distributed):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer
    from tests.helpers.megatron_gpt import GLOBAL_BATCH, batch, build_gpt, full_params, setup

    ps = setup(1)
    model = build_gpt(1)
    model.get_parameter(FROZEN).requires_grad_(False)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed))
    config = OptimizerConfig(optimizer="adam", lr=0.02, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                             adam_eps=1e-8, clip_grad=0.0, use_distributed_optimizer=distributed)
    opt = get_megatron_marsm_optimizer(config, [ddp], ns_dtype=torch.float32)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    lo, hi = dp_rank * GLOBAL_BATCH // dp, (dp_rank + 1) * GLOBAL_BATCH // dp
    for t in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, pos, mask, labels = batch(t)
        ddp(tokens[lo:hi], pos[lo:hi], mask, labels=labels[lo:hi]).float().mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()[0]
    return full_params(ddp, ps)


FROZEN = "decoder.layers.0.mlp.linear_fc1.weight"


def megatron_reference(rank, world_size):
    from tests.helpers.megatron_gpt import single_process_params

    return single_process_params(STEPS, frozen=(FROZEN,))


@pytest.mark.parametrize("distributed", [False, True], ids=["replicated", "distributed-optimizer"])
def test_megatron_frozen_layer(distributed):
    pytest.importorskip("megatron.core")
    want = run_distributed(megatron_reference, 1)[0]
    for got in run_distributed(megatron_run, 2, distributed):
        for n in want:
            assert (got[n] - want[n]).abs().max().item() < 1e-5, n
        assert torch.equal(got[FROZEN], want[FROZEN])


def resized_run(rank, world_size):
    """DDP-style replication at W=2: after a step, a matrix is resized in place and its state
    dropped (so the statistics phase accepts it); the plan still says (8, 8)."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    opt = MARSM([{"params": [w], "use_marsm": True}, {"params": [b], "use_marsm": False}],
                process_group=dist.group.WORLD)
    w.grad, b.grad = torch.ones(8, 8), torch.ones(8)
    opt.step()
    w.data = torch.randn(4, 8)
    del opt.state[w]
    w.grad, b.grad = torch.ones(4, 8), torch.ones(8)
    before = (w.detach().clone(), b.detach().clone(), {k: v.clone() for k, v in opt.state[b].items()})
    with pytest.raises(RuntimeError, match="planned for 64"):
        opt.step()
    return (torch.equal(w, before[0]) and torch.equal(b, before[1])
            and all(torch.equal(v, opt.state[b][k]) for k, v in before[2].items()))


def test_a_stale_plan_is_refused_before_the_first_write():
    assert run_distributed(resized_run, 2) == [True, True]
