"""Pretrain a small Megatron-core GPT with MARS-M: tensor, data parallelism, distributed optimizer.

    torchrun --nproc-per-node 4 pretrain_gpt.py \
        --tensor-model-parallel-size 2 --use-distributed-optimizer --bf16

(from this folder; or ``bash launch/megatron.sh`` from the repository). Copy this folder and
``pip install "marsm-dist[megatron]"``: nothing else is needed. This is a plain megatron-core
training loop: Megatron's ``GPTModel``, its ``DistributedDataParallel``, its LR/weight-decay
scheduler and its ``dist_checkpointing``. The one MARS-M line is the optimizer builder:
``get_megatron_marsm_optimizer`` where Megatron has ``get_megatron_optimizer``, with the
``--marsm-*`` flags from ``add_marsm_args``. ``corpus.py`` beside it holds the data: the Python
standard library's source, as bytes (vocabulary 256), so nothing is downloaded.

Needs CUDA GPUs (NCCL): megatron-core's GPT and DDP code paths call ``torch.cuda``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from corpus import Windows, causal_mask, stdlib_bytes  # corpus.py, beside this script
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig

from marsm_dist.adapters.megatron import add_marsm_args, get_megatron_marsm_optimizer, marsm_kwargs_from_args
from marsm_dist.shutdown import run_and_exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Megatron-style flags (a subset) plus MARS-M's ``--marsm-*``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard MARS-M's state (and fp32 master weights) over the data-parallel ranks")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=None)
    p.add_argument("--ffn-hidden-size", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--lr", type=float, default=6e-3)
    p.add_argument("--min-lr", type=float, default=6e-4)
    p.add_argument("--lr-warmup-iters", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save", default=None, help="dist-checkpoint directory written at the end")
    p.add_argument("--load", default=None, help="dist-checkpoint directory to resume from")
    p.add_argument("--seed", type=int, default=1234)
    return add_marsm_args(p).parse_args(argv)


def build_model(args: argparse.Namespace) -> GPTModel:
    """A byte-level GPT (vocabulary 256, RoPE, no dropout) with Megatron's local layer spec (no
    Transformer Engine). Weights are initialized on the CPU from torch's seed, so they are the
    same at every tensor-parallel size (a checkpoint resumes at another TP size)."""
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        tensor_model_parallel_size=args.tensor_model_parallel_size, bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        # The fused kernels come with Apex / Transformer Engine, which this recipe does not need.
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=256,
                    max_sequence_length=args.seq_length, position_embedding_type="rope")


def main(argv: list[str] | None = None) -> None:
    """Initialize parallel state, build model and MARS-M, train, log, optionally save/load."""
    args = parse_args(argv)
    if args.lr_warmup_iters >= args.train_iters:
        raise SystemExit(f"--lr-warmup-iters ({args.lr_warmup_iters}) must be below --train-iters")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
    try:
        _run(args, torch.device("cuda") if cuda else torch.device("cpu"))
    except (AssertionError, RuntimeError) as err:
        if cuda or "CUDA" not in str(err):
            raise
        raise SystemExit(
            "integrations/megatron/pretrain_gpt.py (launch/megatron.sh) needs CUDA GPUs: megatron-core's "
            "GPT forward and its DDP gradient buffers call torch.cuda. On this CPU machine try MARS-M "
            "with FSDP2 or DeepSpeed instead, e.g. bash launch/demo.sh. "
            f"(megatron-core said: {err})") from err


def _run(args: argparse.Namespace, device: torch.device) -> None:
    """Model, MARS-M, scheduler; load, train, save."""
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    model = build_model(args).to(device)
    ddp = DistributedDataParallel(
        config=model.config, module=model,
        ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=args.use_distributed_optimizer,
                                                 grad_reduce_in_fp32=args.bf16))
    config = OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                             clip_grad=args.clip_grad, bf16=args.bf16,
                             use_distributed_optimizer=args.use_distributed_optimizer)
    # The one MARS-M line: Megatron's training code calls get_megatron_optimizer here.
    optimizer = get_megatron_marsm_optimizer(config, [ddp], **marsm_kwargs_from_args(args))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters, lr_decay_style="cosine", start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant")

    first = 0
    if args.load:
        first = load_checkpoint(args.load, ddp, optimizer, scheduler)
    train(args, ddp, optimizer, scheduler, first, device)
    if args.save:
        save_checkpoint(args.save, ddp, optimizer, scheduler, args.train_iters)


def train(args: argparse.Namespace, ddp: DistributedDataParallel, optimizer, scheduler, first: int,
          device: torch.device) -> None:
    """Iterations ``first`` to ``--train-iters``: Megatron's forward, backward, gradient
    all-reduce (``finalize_model_grads``), optimizer and scheduler step; rank 0 logs."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    if args.global_batch_size % dp:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by DP={dp}")
    micro = args.global_batch_size // dp
    windows = Windows(stdlib_bytes(), args.seq_length, args.seed)
    mask = causal_mask(args.seq_length, device)
    position_ids = torch.arange(args.seq_length, device=device).unsqueeze(0).expand(micro, -1)
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"MARS-M on megatron-core: TP={args.tensor_model_parallel_size} DP={dp} "
              f"distributed_optimizer={args.use_distributed_optimizer} bf16={args.bf16}", flush=True)

    start, step_ms = time.perf_counter(), 0.0
    for it in range(first, args.train_iters):
        x, y = windows.batch(it, args.global_batch_size, dp_rank, dp)
        x = x.to(device)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(x, position_ids, mask, labels=y.to(device)).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        t0 = time.perf_counter()
        ok, grad_norm, _ = optimizer.step()
        step_ms += (time.perf_counter() - t0) * 1e3
        if ok:
            scheduler.step(increment=1)
        done = it + 1
        if rank0 and (done % args.log_interval == 0 or done == args.train_iters):
            n = done - first
            tokens = n * args.global_batch_size * args.seq_length
            print(f"iteration {done}/{args.train_iters} loss {loss.item():.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} grad_norm {float(grad_norm or 0.0):.3f} "
                  f"{tokens / (time.perf_counter() - start):,.0f} tok/s optimizer {step_ms / n:.1f} ms/step",
                  flush=True)


def save_checkpoint(path: str, ddp: DistributedDataParallel, optimizer, scheduler, iteration: int) -> None:
    """Megatron dist-checkpoint: model and MARS-M state (parameter-shaped, any TP/DP to load)."""
    os.makedirs(path, exist_ok=True)
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save({"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd),
                             "scheduler": scheduler.state_dict(), "iteration": iteration}, path)
    if dist.get_rank() == 0:
        print(f"saved {path} at iteration {iteration}", flush=True)


def load_checkpoint(path: str, ddp: DistributedDataParallel, optimizer, scheduler) -> int:
    """Load :func:`save_checkpoint`'s output; returns the iteration to continue from."""
    model_sd = ddp.module.sharded_state_dict()
    template = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}
    loaded = dist_checkpointing.load(template, path)
    ddp.module.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} at iteration {loaded['iteration']}", flush=True)
    return int(loaded["iteration"])


if __name__ == "__main__":
    # Exit code 0 after a success, 1 with the traceback after a failure (a SystemExit's own code
    # for --help or a refused flag). It ends with barrier, destroy_process_group and os._exit, and
    # stops Megatron's checkpoint-writer process first: see marsm_dist/shutdown.py for why.
    run_and_exit(main)
