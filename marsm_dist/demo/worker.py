"""What every rank runs: join the group, train once per optimizer, and (rank 0) report."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import NoReturn

import torch

from ..shutdown import run_and_exit
from . import report
from .cli import base_config, optimizer_names
from .data import Batches, stdlib_corpus
from .dist_env import DistEnv, init_from_env
from .ns_dtype import resolve_ns_dtype
from .progress import ProgressBar
from .stepper import Stepper
from .train import Config, Result, train


def _stepper(cfg: Config, env: DistEnv) -> Stepper:
    """The framework's :class:`Stepper` for ``cfg`` (imported here: each needs its framework)."""
    if cfg.framework == "megatron":
        from .megatron_setup import MegatronStepper

        return MegatronStepper(cfg, env)
    if cfg.framework == "deepspeed":
        from .deepspeed_setup import DeepSpeedStepper

        return DeepSpeedStepper(cfg, env)
    from .fsdp2_setup import FSDP2Stepper

    return FSDP2Stepper(cfg, env)


_NS_NOTE = " (torch.optim.Muon always uses bfloat16, which is slow where bf16 matmuls are emulated)"


def _describe(base: Config, env: DistEnv, batches: Batches, n_params: int) -> str:
    backend = torch.distributed.get_backend()
    kind = "GPT"
    if base.framework == "megatron":
        kind = f"megatron-core GPTModel (RoPE, untied head), tensor-parallel size {base.tensor_parallel},"
    return (f"marsm demo: {base.framework} on {env.world_size} rank(s) ({backend}, {env.device.type}, "
            f"{torch.get_num_threads()} torch thread(s) each)\n"
            f"model: byte-level {kind} d={base.d_model} layers={base.layers} heads={base.heads} "
            f"({n_params / 1e6:.2f}M params); corpus: {len(batches.train):,} training and "
            f"{len(batches.val):,} validation bytes of Python stdlib source\n"
            f"budget: {base.steps} steps x {base.batch_size}x{base.seq_len} tokens = "
            f"{base.steps * base.batch_size * base.seq_len:,} tokens per optimizer, seed {base.seed}; "
            f"MARS-M mode {base.mode}{'' if base.gamma is None else f', gamma {base.gamma:g}'}, "
            f"Newton-Schulz in {base.ns_dtype}"
            f"{_NS_NOTE if base.ns_dtype == 'float32' else ''}")


def train_all(args: argparse.Namespace, env: DistEnv) -> list[Result]:
    """Train one model per optimizer from the same initial weights on the same batches."""
    base = base_config(args)
    base = replace(base, ns_dtype=resolve_ns_dtype(base.ns_dtype, env.device))
    batches = Batches(*stdlib_corpus(), base.batch_size, base.seq_len, base.seed)
    results = []
    for i, name in enumerate(optimizer_names(args)):
        cfg = replace(base, optimizer=name)
        stepper = _stepper(cfg, env)
        if env.is_main and i == 0:
            print(_describe(base, env, batches, stepper.n_params), flush=True)
        bar = None
        if env.is_main:
            bar = ProgressBar(name, cfg.steps, cfg.batch_size * cfg.seq_len, cfg.log_every)
        results.append(train(cfg, batches, env, stepper, bar.update if bar else None))
        if bar:
            bar.close()
        del stepper
    if env.is_main:
        _report(args, base, env, results)
    return results


def _report(args: argparse.Namespace, base: Config, env: DistEnv, results: list[Result]) -> None:
    print("\n" + report.table(results), flush=True)
    settings = {k: v for k, v in asdict(base).items() if k not in ("optimizer", "lr")}
    meta = {"world_size": env.world_size, "backend": torch.distributed.get_backend(),
            "device": env.device.type, "config": settings}
    report.write_json(args.json, meta, results)
    written = [str(args.json)]
    title = (f"{base.framework}, {env.world_size} ranks: GPT d={base.d_model} L={base.layers}, "
             f"{base.steps} steps x {base.batch_size}x{base.seq_len} bytes")
    if report.plot(args.png, results, title):
        written.append(str(args.png))
    print(f"wrote {', '.join(written)}", flush=True)


def run_worker(args: argparse.Namespace, on_exit: Callable[[bool], None] | None = None) -> NoReturn:
    """Run this rank to the end and leave the process (never returns; exit code 0 or 1).

    The ending is :func:`marsm_dist.shutdown.run_and_exit`'s: barrier and destroy after a success,
    then ``os._exit`` (torch 2.13's gloo ranks otherwise abort now and then at interpreter exit);
    ``on_exit(ok)`` runs after the process group is gone (the MPI entry point's Finalize or Abort)."""

    def body() -> None:
        try:
            train_all(args, init_from_env(args.threads))
        except (Exception, KeyboardInterrupt):
            print(f"rank {os.environ.get('RANK', '?')} failed:", file=sys.stderr, flush=True)
            raise

    run_and_exit(body, on_exit)
