"""Megatron dist-checkpointing of MARSM: save mid-run, rebuild, load, continue; the result must
equal the uninterrupted run. Both optimizers save the same global tensors (the distributed one each
rank's ranges of them), so a checkpoint loads into either, at another TP x DP split too; writing it
must not make a rank hold the whole model's state."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.helpers.distributed import run_distributed  # noqa: E402
from tests.helpers.megatron_gpt import batch, build_gpt, full_params, setup  # noqa: E402

pytestmark = pytest.mark.distributed
HALF = 4


def build(tp, distributed, bf16=False, swiglu=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer

    model = build_gpt(tp, swiglu)
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


def save_and_resume(rank, world_size, tp, save_distributed, load_distributed, ckpt_dir, load_tp=None,
                    **model):
    from megatron.core import dist_checkpointing

    ps = setup(tp, fake_cuda_type=True)
    ddp, opt = build(tp, save_distributed, **model)
    train(ddp, opt, ps, HALF, 0)
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd)}, ckpt_dir)
    masters = [master_weights(ddp, opt, ps)]
    train(ddp, opt, ps, HALF, HALF)
    uninterrupted = full_params(ddp, ps)

    if load_tp is not None:  # the same ranks, another TP x DP split
        ps.destroy_model_parallel()
        ps, tp = setup(load_tp, fake_cuda_type=True), load_tp
    torch.manual_seed(99)  # the rebuilt model starts elsewhere: everything must come from the checkpoint
    ddp, opt = build(tp, load_distributed, **model)
    model_sd = ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": opt.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(template, ckpt_dir)
    ddp.module.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["optimizer"])
    masters.append(master_weights(ddp, opt, ps))
    train(ddp, opt, ps, HALF, HALF)
    return uninterrupted, full_params(ddp, ps), *masters


def master_weights(ddp, opt, ps) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the bf16 parameters, in each parameter's (TP-local) shape."""
    import torch.distributed as dist

    inner, out = opt.chained_optimizers[0], {}
    names = {p: n for n, p in ddp.module.named_parameters()}
    if hasattr(inner, "shards"):  # distributed: this DP rank's range of each
        for s in inner.shards:
            if s.param.dtype != torch.float32:
                full = torch.zeros(s.param.numel())
                full[s.start:s.stop] = s.main
                dist.all_reduce(full, group=ps.get_data_parallel_group())  # disjoint ranges: a gather
                out[names[s.param]] = full.view(s.param.shape)
    else:
        groups = zip(getattr(inner, "float16_groups", []), getattr(inner, "fp32_from_float16_groups", []),
                     strict=True)
        for params, mains in groups:
            out.update({names[p]: m.detach().clone() for p, m in zip(params, mains, strict=True)})
    return out


def resume(tmp_path, world, tp, save_distributed, load_distributed, load_tp=None, **model):
    """Every rank's (uninterrupted, resumed) full parameters."""
    def run(rank, world_size):
        return save_and_resume(rank, world_size, tp, save_distributed, load_distributed, str(tmp_path),
                               load_tp, **model)
    return run_distributed(run, world)


@pytest.mark.parametrize(("tp", "save_distributed", "load_distributed"),
                         [(1, True, True), (2, True, True), (1, False, False), (1, True, False),
                          (1, False, True)],
                         ids=["distopt", "tp2-distopt", "replicated", "distopt-to-replicated",
                              "replicated-to-distopt"])
def test_resume_from_dist_checkpoint_matches_uninterrupted_run(tmp_path, tp, save_distributed,
                                                              load_distributed):
    for uninterrupted, resumed, *_ in resume(tmp_path, 2 * tp, tp, save_distributed, load_distributed):
        for n in uninterrupted:
            assert (uninterrupted[n] - resumed[n]).abs().max() < 1e-6, n


@pytest.mark.parametrize("load_distributed", [True, False], ids=["distopt", "distopt-to-replicated"])
def test_bf16_swiglu_resume_keeps_the_fp32_master_weights(tmp_path, load_distributed):
    """bf16 weights: the sharded fp32 master weights are saved (as this rank's ranges) and restored,
    into either optimizer. SwiGLU's fc1 is saved through Megatron's factory (W, V halves apart)."""
    for uninterrupted, resumed, saved, loaded in resume(tmp_path, 4, 2, True, load_distributed, bf16=True,
                                                        swiglu=True):
        assert saved.keys() == loaded.keys() and len(saved) > 0
        for n in saved:
            assert torch.equal(saved[n], loaded[n]), n
        for n in uninterrupted:
            diff = (uninterrupted[n].float() - resumed[n].float()).abs().max()
            # The replicated optimizer sums the clipping norm in another order: bf16 rounding flips
            # (measured: at most 1 ulp). The master weights above are what must cross exactly.
            ulp = 2 ** -7 * float(uninterrupted[n].float().abs().max().clamp(min=1))
            assert diff == 0 if load_distributed else diff <= 2 * ulp, (n, diff)


def test_distributed_checkpoint_loads_at_another_tp_and_dp_size(tmp_path):
    """Saved at TP=1 x DP=4 (every rank a quarter of each parameter), resumed at TP=2 x DP=2, where
    ranks hold other ranges of other blocks. TP changes the reduction order: equal up to rounding."""
    for uninterrupted, resumed, *_ in resume(tmp_path, 4, 1, True, True, load_tp=2):
        for n in uninterrupted:
            assert (uninterrupted[n] - resumed[n]).abs().max() < 1e-5, n


def save_memory(rank, world_size, ckpt_dir):
    from megatron.core import dist_checkpointing

    from marsm_dist.diagnostics import PeakMemory

    ps = setup(1, fake_cuda_type=True)
    ddp, opt = build(1, True)
    train(ddp, opt, ps, 1, 0)
    inner = opt.chained_optimizers[0].optimizer
    shard = sum(t.numel() * t.element_size() for st in inner.state.values()
                for k, t in st.items() if isinstance(t, torch.Tensor) and k != "step")
    model_sd = ddp.module.sharded_state_dict()
    with PeakMemory() as held:  # bytes of the tensors made from here on, while they are alive
        optimizer_sd = opt.sharded_state_dict(model_sd)
        built = held.live
        # The model's own tensors are Megatron's to write, the same with any optimizer: left out.
        dist_checkpointing.save({"optimizer": optimizer_sd}, ckpt_dir)
    return shard, built, held.peak


def test_checkpoint_save_holds_at_most_this_ranks_shard_of_the_state(tmp_path):
    """DP=4: a rank holds 1/4 of every parameter's state; writing a checkpoint must not make it hold
    more than about that again (a param-shaped copy of each tensor is the whole model's state: 4x)."""
    for shard, built, peak in run_distributed(save_memory, 4, str(tmp_path)):
        assert built <= 1024, (built, shard)  # the pieces to write are views of the live state
        assert peak <= shard + 16384, (peak, shard)  # whatever the writer copies on the way
