"""Sections f and h, which run in child processes under a timeout: peak step memory
(benchmarks/memory.py) and the distributed checks (one process per rank, dist_worker.py)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from .core import ROOT, Ctx, Skip, log, run_checks


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def memory(ctx: Ctx) -> dict:
    """Section f: benchmarks/memory.py's JSON, embedded as it is."""
    script = ROOT / "benchmarks" / "memory.py"
    if not script.exists():
        raise Skip("benchmarks/memory.py does not exist yet")
    out = ctx.tmp / "memory.json"
    if ctx.dry:  # meta: shapes without data, the same wiring in seconds (a CPU run takes minutes
        # on 2 busy cores); the GPU run below measures real memory
        args = ["--device", "meta", "--models", "gpt2-small", "--worlds", "1", "--layers", "1"]
    else:
        args = ["--device", "cuda", "--models", "gpt2-small,llama3-8b", "--worlds", "1", "--layers", "4"]
    cmd = [sys.executable, str(script), *args, "--json", str(out)]
    shown = " ".join(["python", "benchmarks/memory.py", *args, "--json", "<tmp>"])
    log(f"  memory: {shown}")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(ctx), capture_output=True, text=True,
                              timeout=60 if ctx.dry else 240)
    except subprocess.TimeoutExpired as err:
        raise Skip(f"{shown} timed out after {err.timeout:.0f} s",
                   error=_tail(str(err.stderr or "") + str(err.stdout or ""))) from err
    if proc.returncode != 0 or not out.exists():
        raise Skip(f"{shown} failed (exit {proc.returncode})", error=_tail(proc.stderr + proc.stdout))
    table = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"command": shown, "result": json.loads(out.read_text()), "stdout_tail": table[-12:],
            "summary": f"memory.py ok; JSON embedded ({', '.join(args[1:6:2])})"}


def _child_env(ctx: Ctx) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if ctx.dry:
        env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")  # 2 ranks share a small CPU
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(ctx: Ctx, check: str, world: int, backend: str, timeout: float) -> list[dict]:
    """Run ``check`` on ``world`` fresh processes (rank r on cuda:r with NCCL); their results.

    Raises with the failing rank's traceback, or after ``timeout`` seconds (a hung collective),
    having killed every rank.
    """
    out_dir = ctx.tmp / f"{check}-w{world}"
    out_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = _child_env(ctx)
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GPU_CHECK_BACKEND=backend)
        logs.append(open(out_dir / f"rank{rank}.log", "w"))  # noqa: SIM115  (closed below)
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check.dist_worker", check,
                                       str(out_dir)], cwd=ROOT, env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
    deadline, timed_out = time.monotonic() + timeout, False
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            time.sleep(3)  # the others may still be writing their own error; then stop them
            break
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for f in logs:
        f.close()
    results = {}
    for rank in range(world):
        path = out_dir / f"{check}-{rank}.json"
        if path.exists():
            results[rank] = json.loads(path.read_text())
    bad = [r for r in range(world) if not results.get(r, {}).get("ok")]
    if bad:
        r = bad[0]
        why = results[r]["error"] if r in results else (
            f"no result (exit {procs[r].returncode}{f', killed after {timeout:.0f} s' if timed_out else ''})")
        log_tail = _tail((out_dir / f"rank{r}.log").read_text(errors="replace"), 1500)
        raise RuntimeError(f"{check}: rank {r} of {world} ({backend}) failed: {why}\n--- rank {r} output:\n"
                           f"{log_tail}")
    return [results[r] for r in range(world)]


def _fsdp2(ctx: Ctx, world: int, backend: str) -> dict:
    ranks = launch_ranks(ctx, "fsdp2", world, backend, timeout=90 if ctx.dry else 240)
    out: dict = {"problems": []}
    # fp32 NS: the sharded optimizer on the same gradients must be bit-close; an independent
    # single-process run differs only through gradient rounding (~1e-5 after a few steps).
    bars = {"float32": {"shadow_max_abs_diff": 1e-5, "independent_max_abs_diff": 1e-3},
            "bfloat16": {"shadow_max_abs_diff": 1e-4}}
    for ns, limits in bars.items():
        row = {k: max(r[ns][k] for r in ranks) for k in ("shadow_max_abs_diff", "independent_max_abs_diff")}
        row["bytes_sent_per_rank"] = [r[ns]["bytes_sent"] for r in ranks]
        row["owned_matrices_per_rank"] = [r[ns]["owned_matrices"] for r in ranks]
        row["limits"] = limits
        out[ns] = row
        for key, bar in limits.items():
            if not row[key] <= bar:  # also catches NaN
                out["problems"].append(f"{ns} NS: {key} {row[key]:.2e} > {bar:g}")
    out["devices"] = [r["device"] for r in ranks]
    return out


def _framework(ctx: Ctx, check: str, module: str, world: int, backend: str,
               judge: Callable[[list[dict]], list[str]]) -> Callable[[], dict]:
    def run() -> dict:
        if ctx.dry and not ctx.frameworks:
            raise Skip(f"dry mode: {module} checks on the CPU take minutes (JIT builds); pass --frameworks")
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise Skip(f"{module} is not installed")
        try:
            importlib.import_module(module)
        except Exception as err:
            raise Skip(f"import {module} failed: {type(err).__name__}: {err}"[:500]) from err
        ranks = launch_ranks(ctx, check, world, backend, timeout=180 if ctx.dry else 300)
        return {"ranks": ranks, "problems": judge(ranks)}
    return run


def _judge_deepspeed(ranks: list[dict]) -> list[str]:
    diff = max(r["max_abs_diff"] for r in ranks)
    problems = [] if diff <= 1e-4 else [f"max |DeepSpeed - single process| {diff:.2e} > 1e-4"]
    return problems + [f"optimizer is {r['optimizer']}" for r in ranks[:1] if r["optimizer"] != "MARSM"]


def _judge_megatron(ranks: list[dict]) -> list[str]:
    losses = ranks[0]["losses"]
    if not all(math.isfinite(x) for x in losses) or not losses[-1] < losses[0]:
        return [f"losses on a repeated batch do not fall: {losses}"]
    return []


def distributed(ctx: Ctx) -> dict:
    """Section h: FSDP2 vs single process over NCCL (gloo in dry mode), DeepSpeed ZeRO-2/3 and
    Megatron's distributed optimizer where those packages import."""
    if ctx.dry:
        backend, world = "gloo", 2
    else:
        backend, world = "nccl", min(torch.cuda.device_count(), 4)
    log(f"  distributed: W={world} over {backend}")
    checks = run_checks({
        "fsdp2": lambda: _fsdp2(ctx, world, backend),
        "deepspeed_zero2": _framework(ctx, "deepspeed_zero2", "deepspeed", world, backend, _judge_deepspeed),
        "deepspeed_zero3": _framework(ctx, "deepspeed_zero3", "deepspeed", world, backend, _judge_deepspeed),
        "megatron_distopt": _framework(ctx, "megatron_distopt", "megatron.core", world, backend,
                                       _judge_megatron),
    })
    f = checks["fsdp2"]
    diff = (f"fsdp2 fp32 shadow {f['float32']['shadow_max_abs_diff']:.1e}, independent "
            f"{f['float32']['independent_max_abs_diff']:.1e}" if "float32" in f else f"fsdp2 {f['status']}")
    others = ", ".join(f"{n} {c['status']}" for n, c in checks.items() if n != "fsdp2")
    return {"world_size": world, "backend": backend, "checks": checks,
            "summary": f"W={world} {backend}: {diff}; {others}"}
