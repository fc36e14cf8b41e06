"""Megatron-core without the distributed optimizer: data-parallel (DP) replicas must not each run
Newton-Schulz on the same matrices. Every matrix is orthogonalized once in the tensor-and-data-
parallel group (tensor-parallel weights through the adapter's layouts, unmarked matrices through
``MARSM(process_group=...)``), and the run still follows single-process MARSM: same parameters,
same c_t clipping, bitwise identical replicas. Real megatron-core, real gloo groups, on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.helpers.distributed import run_distributed  # noqa: E402
from tests.helpers.megatron_gpt import batch, build_gpt, full_params, setup, single_process_groups  # noqa: E402

pytestmark = pytest.mark.distributed
STEPS = 8
# Scales the loss so that ||c_t|| crosses the clip threshold (1) on some steps and matrices, not
# all: with this model and these batches the single-process run clips [2, 0, 1, 1, 0, 0, 1, 0]
# of its 8 matrices per step, every norm at least ~2e-3 away from 1 (measured).
LOSS_SCALE = 2.3


def _step_with_flops(opt):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = opt.step()
    return result, counter.get_total_flops()


def megatron_run(rank, world_size, tp, distributed, unmark_layer1):
    """Megatron DDP + get_megatron_marsm_optimizer on DP shares of the global batches."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer

    ps = setup(tp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    model = build_gpt(tp)
    if unmark_layer1:  # plain matrices (as a MoE router is): replicated over TP and DP, no adapter
        for name, p in model.named_parameters():
            if ".layers.1." in name and p.ndim == 2:
                p.tensor_model_parallel = False
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed))
    config = OptimizerConfig(optimizer="adam", lr=0.02, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                             adam_eps=1e-8, clip_grad=0.0, use_distributed_optimizer=distributed)
    opt = get_megatron_marsm_optimizer(config, [ddp], ns_dtype=torch.float32)
    inner = opt.chained_optimizers[0].optimizer
    lo, hi = dp_rank * len(batch(0)[0]) // dp, (dp_rank + 1) * len(batch(0)[0]) // dp
    clipped, flops = [], []
    for t in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, pos, mask, labels = batch(t)
        (ddp(tokens[lo:hi], pos[lo:hi], mask, labels=labels[lo:hi]).float().mean() * LOSS_SCALE).backward()
        finalize_model_grads([ddp])
        (success, _, _), step_flops = _step_with_flops(opt)
        assert success
        clipped.append(inner.last_step_stats.clipped)
        flops.append(step_flops)
    expected_group = None if distributed else ps.get_tensor_and_data_parallel_group()
    local = {n.removeprefix("module."): p.detach().clone() for n, p in ddp.named_parameters()}
    return dict(full=full_params(ddp, ps), local=local, tp_rank=ps.get_tensor_model_parallel_rank(),
                clipped=clipped, flops=flops, group_ok=inner.process_group is expected_group)


def reference_run(rank, world_size):
    """Single-process MARSM (no Megatron wrappers) on the TP=1 model and the full batches."""
    from marsm_dist import MARSM

    ps = setup(1)
    model = build_gpt(1)
    groups = single_process_groups(model)
    opt = MARSM(groups, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    clipped, flops = [], []
    for t in range(STEPS):
        tokens, pos, mask, labels = batch(t)
        (model(tokens, pos, mask, labels=labels).float().mean() * LOSS_SCALE).backward()
        _, step_flops = _step_with_flops(opt)
        opt.zero_grad()
        clipped.append(opt.last_step_stats.clipped)
        flops.append(step_flops)
    return dict(full=full_params(model, ps), clipped=clipped, flops=flops, matrices=len(groups[0]["params"]))


@pytest.fixture(scope="module")
def reference():
    ref = run_distributed(reference_run, 1, timeout=90)[0]
    # The clip fires on some steps and not on others: a sequence that can tell them apart.
    assert any(ref["clipped"]) and not all(ref["clipped"]), ref["clipped"]
    assert max(ref["clipped"]) < ref["matrices"], ref["clipped"]
    assert all(f > 0 for f in ref["flops"])
    return ref


@pytest.mark.parametrize(("tp", "world_size", "distributed", "unmark_layer1"),
                         [(1, 2, False, True), (2, 4, False, False), (1, 2, True, False)],
                         ids=["tp1-dp2-tp-and-plain-matrices", "tp2-dp2", "tp1-dp2-distopt"])
def test_each_matrix_is_orthogonalized_once_across_data_parallel_replicas(reference, tp, world_size,
                                                                         distributed, unmark_layer1):
    results = run_distributed(megatron_run, world_size, tp, distributed, unmark_layer1, timeout=90)
    for r in results:
        assert r["clipped"] == reference["clipped"]
        assert r["full"].keys() == reference["full"].keys()
        for n, want in reference["full"].items():
            assert (r["full"][n] - want).abs().max() < 1e-5, n
    # DP replicas (ranks with the same TP rank) hold bitwise the same parameters.
    by_tp: dict[int, dict] = {}
    for r in results:
        first = by_tp.setdefault(r["tp_rank"], r["local"])
        for n, p in r["local"].items():
            assert torch.equal(p, first[n]), n
    assert len(by_tp) == tp
    # Newton-Schulz FLOPs of a step (all matmuls in it): the job does one process's work once, not
    # once per replica, and it is divided (the busiest rank does strictly less than one process).
    for t in range(STEPS):
        single = reference["flops"][t]
        per_rank = [r["flops"][t] for r in results]
        assert sum(per_rank) <= 1.15 * single, (t, per_rank, single)
        assert max(per_rank) < single, (t, per_rank, single)
    # The replicated path divides over the TP x DP group; the distributed one steps its main shards
    # with their own adapter and no process_group.
    assert all(r["group_ok"] for r in results)


def expert_run(rank, world_size):
    """An expert-parallel weight (Megatron marks it ``allreduce=False``: each DP rank holds other
    experts) beside a replicated matrix, stepped by a MARSM over the TP x DP group, and the same
    two as a lone process's unmarked tensors."""
    import marsm_dist.adapters.megatron  # noqa: F401  (Megatron imported: the registry loads its TP adapter)
    from marsm_dist import MARSM

    ps = setup(1)
    expert_init = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))  # this rank's own
    dense_init = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))  # the same everywhere

    def train(params, process_group):
        opt = MARSM([{"params": params, "use_marsm": True}], lr=0.05, ns_dtype=torch.float32,
                    process_group=process_group)
        # The expert's gradients differ between ranks, the replicated matrix's do not.
        gens = [torch.Generator().manual_seed(100 + rank), torch.Generator().manual_seed(7)]
        for _ in range(3):
            for p, gen in zip(params, gens, strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [p.detach().clone() for p in params]

    expert = torch.nn.Parameter(expert_init.clone())
    expert.tensor_model_parallel, expert.partition_dim, expert.partition_stride = True, 0, 1
    expert.allreduce = False
    got = train([expert, torch.nn.Parameter(dense_init.clone())], ps.get_tensor_and_data_parallel_group())
    alone = train([torch.nn.Parameter(expert_init.clone()), torch.nn.Parameter(dense_init.clone())], None)
    return got, alone


def test_expert_parallel_weights_stay_each_ranks_own():
    """Expert weights are not DP replicas: sharing one owner's result would overwrite a rank's
    experts with another's. Each rank must get what a lone process gets on its own weights."""
    for got, alone in run_distributed(expert_run, 2, timeout=60):
        for g, a in zip(got, alone, strict=True):
            assert (g - a).abs().max() < 1e-6
