"""The demo's command line: flags, their defaults, and the checks done before any process starts."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import fields
from pathlib import Path

from .. import MARSM
from .train import DEFAULT_LR, OPTIMIZERS, Config

FRAMEWORKS = ("fsdp2", "deepspeed", "megatron")

DESCRIPTION = """\
Train a small byte-level GPT on the Python standard library's own source with MARS-M, Muon
(torch.optim.Muon for the hidden matrices + AdamW for the rest) and AdamW: same model, seed,
batches and token budget for each. Starts --world-size processes (gloo on CPU, NCCL on GPUs)
unless it already runs under a launcher (torchrun, mpirun via marsm_dist.demo.mpi, deepspeed).
Rank 0 shows a progress bar, prints a comparison table, and writes a loss-curve PNG and a JSON
summary."""


class UsageError(ValueError):
    """A flag combination the demo cannot run; the message says what to do instead."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the demo's flags (every flag has a default)."""
    d = Config()
    p = argparse.ArgumentParser(prog="python -m marsm_dist.demo", description=DESCRIPTION)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated, from {', '.join(OPTIMIZERS)} (default: all)")
    p.add_argument("--framework", choices=FRAMEWORKS, default=d.framework,
                   help="how the model is sharded (default: fsdp2; megatron needs CUDA GPUs)")
    p.add_argument("--world-size", type=int, default=2,
                   help="processes to start (default 2; ignored under a launcher, which sets WORLD_SIZE)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"global batch in sequences, split across ranks (default {d.batch_size})")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr for every optimizer (default: " +
                   ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--mode", choices=["approx", "exact"], default=d.mode,
                   help="MARS-M correction: previous gradient (approx) or look-ahead gradient (exact)")
    p.add_argument("--gamma", type=float, default=d.gamma,
                   help="MARS-M's variance-reduction strength (default: MARSM's, "
                   f"{inspect.signature(MARSM).parameters['gamma'].default:g}; 0 turns the correction "
                   "off, leaving momentum on the plain gradient); marsm only")
    p.add_argument("--ns-dtype", choices=["auto", "bfloat16", "float32"], default=d.ns_dtype,
                   help="MARS-M Newton-Schulz dtype (default auto: bfloat16 on GPUs and CPUs with native "
                   "bf16 matmuls, else float32; torch.optim.Muon always uses bfloat16)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=d.zero_stage,
                   help="ZeRO stage with --framework deepspeed")
    p.add_argument("--tensor-parallel", type=int, default=d.tensor_parallel,
                   help="tensor-parallel size with --framework megatron (default 1; the remaining "
                   "factor of the world size is data parallelism)")
    p.add_argument("--distributed-optimizer", action="store_true",
                   help="with --framework megatron: shard optimizer state (and, for MARS-M, Newton-Schulz "
                   "work) over the data-parallel ranks (MARS-M's own sharding; Megatron's for AdamW)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="progress line every N steps when stderr is not a terminal")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: OMP_NUM_THREADS, else cores / local ranks)")
    p.add_argument("--json", type=Path, default=Path("demo_results/summary.json"),
                   help="JSON summary path (default demo_results/summary.json)")
    p.add_argument("--png", type=Path, default=Path("demo_results/loss.png"),
                   help="loss-curve plot path (default demo_results/loss.png; needs matplotlib)")
    # The deepspeed launcher appends --local_rank to the command line; the env has it too.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def optimizer_names(args: argparse.Namespace) -> list[str]:
    """The --optimizers list, checked."""
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise UsageError(f"--optimizers: unknown {unknown or 'empty list'}; "
                         f"choose from {', '.join(OPTIMIZERS)}")
    return names


def base_config(args: argparse.Namespace) -> Config:
    """The run settings shared by every optimizer."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in known})


def check(args: argparse.Namespace, world_size: int) -> None:
    """Refuse, before starting processes, what cannot run; the message names the flag."""
    names = optimizer_names(args)
    if world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {world_size}")
    tp = args.tensor_parallel
    if tp != 1 and args.framework != "megatron":
        raise UsageError("--tensor-parallel is for --framework megatron (FSDP2 and DeepSpeed runs here "
                         "are data-parallel only)")
    if tp < 1 or world_size % tp:
        raise UsageError(f"--tensor-parallel {tp} must divide the world size {world_size}")
    if args.heads % tp:
        raise UsageError(f"--heads {args.heads} must divide by --tensor-parallel {tp}: "
                         "each tensor-parallel rank holds whole attention heads")
    data_parallel = world_size // tp
    if args.batch_size % data_parallel:
        raise UsageError(f"--batch-size {args.batch_size} must divide by the data-parallel size "
                         f"{data_parallel}: each data-parallel rank takes an equal slice of the global batch")
    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} must divide by --heads {args.heads}")
    if args.gamma is not None and args.gamma < 0:
        raise UsageError(f"--gamma must be >= 0, got {args.gamma}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.framework == "deepspeed" and args.mode == "exact" and "marsm" in names:
        raise UsageError("--mode exact needs a look-ahead gradient before each step, which DeepSpeed's "
                         "engine cannot provide (it reduces gradients inside engine.step()); use "
                         "--framework fsdp2 for the exact mode")
    if args.framework == "megatron" and args.mode == "exact" and "marsm" in names:
        raise UsageError("--mode exact needs a second backward pass per step (the look-ahead gradient), "
                         "which Megatron's training loop does not run; use --framework fsdp2 for it")
    if args.distributed_optimizer and args.framework != "megatron":
        raise UsageError("--distributed-optimizer is for --framework megatron (FSDP2 and DeepSpeed "
                         "shard the optimizer state already)")
    if args.framework == "megatron" and args.distributed_optimizer and "muon" in names:
        raise UsageError("muon with --distributed-optimizer: Megatron's distributed optimizer takes "
                         "only its own Adam/SGD; use --optimizers marsm,adamw")
    if args.framework == "megatron" and tp > 1 and "muon" in names:
        raise UsageError("muon with --tensor-parallel > 1: torch.optim.Muon would orthogonalize each "
                         "tensor-parallel block on its own, not the whole matrix (Megatron's own Muon "
                         "needs the emerging-optimizers package, Python >= 3.12); use "
                         "--optimizers marsm,adamw or --tensor-parallel 1")
