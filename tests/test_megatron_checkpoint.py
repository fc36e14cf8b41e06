"""Megatron dist-checkpointing of MARSM: save mid-run, rebuild, load, continue; the result must
equal the uninterrupted run. The saved state has each parameter's shape, so a checkpoint written
with the distributed optimizer (state sharded over DP) loads into the replicated one too."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.distributed import run_distributed  # noqa: E402
from tests.test_megatron import batch, build_gpt, full_params, setup  # noqa: E402

pytestmark = pytest.mark.distributed
HALF = 4


def build(tp, distributed, bf16=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer

    model = build_gpt(tp)
    if bf16:
        model = model.bfloat16()
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=distributed))
    config = OptimizerConfig(optimizer="adam", lr=0.02, weight_decay=0.1, clip_grad=1.0, bf16=bf16,
                             use_distributed_optimizer=distributed)
    return ddp, get_megatron_marsm_optimizer(config, [ddp], ns_dtype=torch.float32)


def train(ddp, opt, ps, steps, first):
    from megatron.core.distributed import finalize_model_grads

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for t in range(first, first + steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, pos, mask, labels = batch(t)
        lo, hi = dp_rank * len(tokens) // dp, (dp_rank + 1) * len(tokens) // dp
        ddp(tokens[lo:hi], pos[lo:hi], mask, labels=labels[lo:hi]).float().mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()[0]


def save_and_resume(rank, world_size, tp, save_distributed, load_distributed, ckpt_dir):
    from megatron.core import dist_checkpointing

    ps = setup(tp, fake_cuda_type=True)
    ddp, opt = build(tp, save_distributed)
    train(ddp, opt, ps, HALF, 0)
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)
    train(ddp, opt, ps, HALF, HALF)
    uninterrupted = full_params(ddp, ps)

    torch.manual_seed(99)  # the rebuilt model starts elsewhere: everything must come from the checkpoint
    ddp, opt = build(tp, load_distributed)
    model_sd = ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(template, ckpt_dir)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    train(ddp, opt, ps, HALF, HALF)
    return uninterrupted, full_params(ddp, ps)


@pytest.mark.parametrize(("tp", "save_distributed", "load_distributed"),
                         [(1, True, True), (2, True, True), (1, False, False), (1, True, False)],
                         ids=["distopt", "tp2-distopt", "replicated", "distopt-to-replicated"])
def test_resume_from_dist_checkpoint_matches_uninterrupted_run(tmp_path, tp, save_distributed,
                                                              load_distributed):
    world = 2 * tp
    for uninterrupted, resumed in run_distributed(save_and_resume, world, tp, save_distributed,
                                                  load_distributed, str(tmp_path)):
        for n in uninterrupted:
            assert (uninterrupted[n] - resumed[n]).abs().max() < 1e-6, n
