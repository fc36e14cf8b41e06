"""Megatron dist-checkpoints of MARS-M with MoE experts and context parallelism move between shapes:
saved after 4 steps at one (TP, EP, ETP, CP, DP) split and optimizer, loaded into another split and
optimizer on the same 4 ranks, 4 more steps; the result must be the single-process trajectory of 8
steps (every expert a separate 2-D matrix), as an uninterrupted run is. The momentum, P, the Adam
moments and the step counters all come from the checkpoint: the rebuilt model starts from other
weights and a fresh optimizer would land elsewhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.helpers.distributed import run_distributed  # noqa: E402
from tests.helpers.megatron_gpt import (  # noqa: E402
    batch,
    full_moe_params,
    load_full_params,
    setup_moe,
)
from tests.test_megatron_moe import LR, STEPS, _model, reference_run  # noqa: E402

pytestmark = pytest.mark.distributed
HALF = STEPS // 2


def _build(shape: dict, experts, ps, init=None):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer

    model, scale = _model(shape["tp"], shape["ep"], shape["etp"], experts)
    if init is not None:  # before DDP and the optimizer copy the weights
        load_full_params(model, ps, init)
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        use_distributed_optimizer=shape["distributed"]))
    config = OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                             adam_eps=1e-8, clip_grad=0.0, use_distributed_optimizer=shape["distributed"])
    return ddp, get_megatron_marsm_optimizer(config, [ddp], ns_dtype=torch.float32), scale


def _train(ddp, opt, ps, scale, first: int) -> None:
    from megatron.core.distributed import finalize_model_grads

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = len(batch(0)[0])
    lo, hi = dp_rank * n // dp, (dp_rank + 1) * n // dp
    for t in range(first, first + HALF):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        tokens, pos, mask, labels = batch(t)
        (ddp(tokens[lo:hi], pos[lo:hi], mask, labels=labels[lo:hi]).float().mean() * scale).backward()
        finalize_model_grads([ddp])
        assert opt.step()[0]


def save_load_run(rank, world_size, save: dict, load: dict, experts, init, ckpt_dir: str):
    from megatron.core import dist_checkpointing

    ps = setup_moe(save["tp"], save["ep"], save["etp"], save["cp"])
    ddp, opt, scale = _build(save, experts, ps, init)
    _train(ddp, opt, ps, scale, 0)
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)

    ps.destroy_model_parallel()
    ps = setup_moe(load["tp"], load["ep"], load["etp"], load["cp"])
    torch.manual_seed(99)  # the rebuilt model starts elsewhere: everything must come from the checkpoint
    ddp, opt, scale = _build(load, experts, ps)
    model_sd = ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(template, ckpt_dir)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    _train(ddp, opt, ps, scale, HALF)
    return {n: t.float() for n, t in full_moe_params(ddp, ps).items()}


def _shape(tp=1, ep=1, etp=1, cp=1, distributed=False) -> dict:
    return dict(tp=tp, ep=ep, etp=etp, cp=cp, distributed=distributed)


@pytest.fixture(scope="module")
def moe_reference():
    return run_distributed(reference_run, 1, 4, timeout=60)[0]


@pytest.mark.parametrize(("save", "load"), [
    (_shape(ep=2, distributed=True), _shape(tp=2, ep=2, etp=1)),
    (_shape(tp=2, ep=2, etp=2), _shape(ep=4, distributed=True)),
    (_shape(ep=2, cp=2), _shape(ep=2, distributed=True)),
], ids=["ep2-edp2-distopt-to-tp2-ep2-replicated", "tp2-ep2-etp2-to-ep4-distopt",
        "cp2-ep2-to-ep2-dp2-distopt"])
def test_moe_checkpoint_moves_between_shapes(tmp_path, moe_reference, save, load):
    for got in run_distributed(save_load_run, 4, save, load, 4, moe_reference["init"], str(tmp_path),
                               timeout=180):
        assert got.keys() == moe_reference["full"].keys()
        for n, want in moe_reference["full"].items():
            assert (got[n] - want).abs().max() < 1e-5, n
