"""One rank of a section-h check: ``python -m benchmarks.gpu_check.dist_worker CHECK OUT_DIR``.

The parent (``external.py``, ``shared_gpu.py``) starts one process per rank with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT and GPU_CHECK_BACKEND (nccl: rank r on cuda:r; gloo: CPU; gloo-cuda:
every rank on cuda:0, gloo carrying the CUDA tensors) set. Each rank writes
``OUT_DIR/CHECK-RANK.json`` (its figures, or its traceback) *before* leaving the process group, so
a crash at exit (torch's gloo processes abort now and then at interpreter exit) loses nothing.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from marsm_dist import MARSM, param_groups
from marsm_dist.shutdown import exit_process, leave_process_group

from . import shared_worker
from .optim import full_fp32

GLOBAL_BATCH, SEQ, STEPS = 8, 32, 5


def _batch(t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(100 + t))
    return x[:, :-1].to(device), x[:, 1:].to(device)


def _gpt(device: torch.device) -> torch.nn.Module:
    # The FSDP2 tests' GPT: its QKV has no bias, whose key part would get an exactly zero gradient
    # that Adam turns into rounding-noise steps, different in two exact runs (tests/helpers/fsdp2_models.py).
    from tests.helpers.fsdp2_models import GPT

    torch.manual_seed(0)
    return GPT(d=64, layers=2, heads=4, seq_len=SEQ).to(device)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


def fsdp2(rank: int, world: int, device: torch.device) -> dict:
    """FSDP2 MARSM vs (1) a single-process MARSM fed the sharded run's full gradients (isolates the
    optimizer) and (2) an independent single-process run on the whole batch, fp32 and bf16 NS."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for ns in ("float32", "bfloat16"):
        model = _gpt(device)
        twin, solo = copy.deepcopy(model), copy.deepcopy(model)
        mesh = init_device_mesh(device.type, (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opts = [MARSM(param_groups(m), lr=0.02, ns_dtype=ns) for m in (model, twin, solo)]
        lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
        for t in range(STEPS):
            x, y = _batch(t, device)
            model(x[lo:hi], y[lo:hi]).backward()
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                q.grad = None if p.grad is None else p.grad.full_tensor().clone()
            solo(x, y).backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()
        full = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        stats = opts[0].last_step_stats
        out[ns] = {"shadow_max_abs_diff": _max_diff(full, dict(twin.named_parameters())),
                   "independent_max_abs_diff": _max_diff(full, dict(solo.named_parameters())),
                   "bytes_sent": stats.bytes_sent, "bytes_received": stats.bytes_received,
                   "owned_matrices": stats.owned_matrices}
    return out


def deepspeed_stage(stage: int):
    """ZeRO-``stage`` MARSM (JSON ``"type": "MARSM"``) vs single-process MARSM on the same device."""
    def check(rank: int, world: int, device: torch.device) -> dict:
        import deepspeed

        import marsm_dist.adapters.deepspeed  # noqa: F401  (registers "MARSM" for the JSON config)

        model = _gpt(device)
        solo = copy.deepcopy(model)
        cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
               "gradient_clipping": 0.0,  # DeepSpeed would default to 1.0; the reference does not clip
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
               "optimizer": {"type": "MARSM", "params": {"lr": 0.02, "ns_dtype": "float32"}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        ref = MARSM(param_groups(solo), lr=0.02, ns_dtype="float32")
        lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
        for t in range(STEPS):
            x, y = _batch(t, device)  # the engine's device too (LOCAL_RANK's GPU, or the CPU)
            engine.backward(engine(x[lo:hi], y[lo:hi]))
            engine.step()
            solo(x, y).backward()
            ref.step()
            ref.zero_grad()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
            got = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        base = engine.optimizer.optimizer if stage else engine.optimizer
        return {"max_abs_diff": _max_diff(got, dict(solo.named_parameters())),
                "optimizer": type(base).__name__}
    return check


def megatron(rank: int, world: int, device: torch.device) -> dict:
    """megatron-core GPTModel in Megatron's DDP with the distributed optimizer, MARSM from
    get_megatron_marsm_optimizer: steps run, the loss stays finite and falls on a repeated batch."""
    if device.type == "cpu":  # dry mode: megatron-core's GPT and DDP call torch.cuda
        from tests.helpers.megatron_cpu_shim import CpuCudaShim

        CpuCudaShim().install()
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from marsm_dist.adapters.megatron import get_megatron_marsm_optimizer

    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256,
                            use_cpu_initialization=True, gradient_accumulation_fusion=False,
                            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                            masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=256,
                     max_sequence_length=SEQ).to(device)
    ddp = DistributedDataParallel(config=cfg, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
    opt = get_megatron_marsm_optimizer(OptimizerConfig(optimizer="adam", lr=0.01, clip_grad=0.0,
                                                       use_distributed_optimizer=True), [ddp])
    x, y = _batch(0, device)
    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    pos = torch.arange(SEQ, device=device).expand(hi - lo, SEQ)
    mask = torch.ones(SEQ, SEQ, dtype=torch.bool, device=device).tril().logical_not().view(1, 1, SEQ, SEQ)
    losses = []
    for _ in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(x[lo:hi], pos, mask, labels=y[lo:hi]).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        ok, _, _ = opt.step()
        if not ok:
            raise RuntimeError("Megatron's optimizer reported an unsuccessful step")
        losses.append(loss.item())
    return {"losses": losses, "optimizer": type(opt.chained_optimizers[0].optimizer).__name__}


def _shared(config: str):
    return lambda rank, world, device: shared_worker.run(config, rank, world, device)


CHECKS = {"fsdp2": fsdp2, "deepspeed_zero2": deepspeed_stage(2), "deepspeed_zero3": deepspeed_stage(3),
          "megatron_distopt": megatron, **{f"shared_{c}": _shared(c) for c in shared_worker.SHAPES}}


def main() -> None:
    """Run one check as this rank, write its JSON, leave the group, exit (never returns)."""
    check, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = os.environ["GPU_CHECK_BACKEND"]
    result: dict = {"rank": rank, "ok": False}
    try:
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        elif backend == "gloo-cuda":  # every rank on the one GPU; gloo moves its CUDA tensors
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)
            backend = "gloo"
        else:
            device = torch.device("cpu")
            torch.set_num_threads(1)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        with full_fp32():
            result.update(CHECKS[check](rank, world, device), ok=True, device=str(device))
    except BaseException:
        result["error"] = traceback.format_exc()[-4000:]
    (out_dir / f"{check}-{rank}.json").write_text(json.dumps(result))
    leave_process_group(result["ok"])  # barrier and destroy, then os._exit: see marsm_dist/shutdown.py
    exit_process(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
