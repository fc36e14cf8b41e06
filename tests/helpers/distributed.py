"""Run a function on W gloo ranks in forked processes, and collect what each rank returns.

Fork is ~4x faster than a torchrun per test. Every worker ends with barrier, destroy and
``os._exit`` (torch 2.13 gloo processes can abort at interpreter exit otherwise); a rank that
fails makes the parent stop the others at once, and a hang fails after ``timeout`` seconds.

``run_with_fake_group`` plays one rank of a larger world in a single forked process, over torch's
fake backend registered for the meta device only: like NCCL on a GPU, that group refuses CPU
tensors ("No backend type associated with device type cpu"); meta tensors pass and move no data.
``run_fake_ranks`` plays every rank that way, each in its own process.

Every rank records the collectives it issues (``collective_order.CollectiveLog``), and when all
ranks succeed their records are checked against NCCL's ordering rules
(``check_collective_order``): a run whose ranks would hang on NCCL fails here, on gloo or on the
fake group, even where gloo itself copes. A test of deliberately mismatched ranks passes
``check_order=False``.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from marsm_dist.shutdown import exit_process, leave_process_group
from tests.helpers.collective_order import CollectiveLog, check_collective_order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world_size: int, port: int | None, out: Path, args: tuple) -> None:
    code = 0
    log = CollectiveLog()
    try:
        torch.set_num_threads(1)
        if port is None:  # a fake meta-only group: this process alone plays `rank`
            from torch.testing._internal.distributed.fake_pg import FakeStore

            dist.init_process_group("meta:fake", store=FakeStore(), rank=rank, world_size=world_size)
        else:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=60))
        with log:
            result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result, "log": log.events}, out / f"{rank}.pt")
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out / f"{rank}.pt")
        code = 1
    # A successful gloo rank barriers before destroying (the meta-only fake group has no CPU
    # barrier); then os._exit, after stopping the helpers a rank started (Megatron's checkpoint
    # writer starts a multiprocessing manager, which would hold pipes open).
    leave_process_group(code == 0 and port is not None)
    exit_process(code)


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, check_order: bool = True) -> list:
    """``fn(rank, world_size, *args)`` on every rank; returns the ranks' results in rank order.
    ``check_order``: check the collectives the ranks issued against NCCL's ordering rules."""
    return _run(fn, world_size, range(world_size), free_port(), args, timeout, check_order)


def run_with_fake_group(fn, world_size: int, *args, rank: int = 0, timeout: float = 180.0):
    """``fn(rank, world_size, *args)`` in one process whose default group is a fake meta-only one."""
    return _run(fn, world_size, [rank], None, args, timeout, False)[0]


def run_fake_ranks(fn, world_size: int, *args, timeout: float = 180.0, check_order: bool = True) -> list:
    """``fn(rank, world_size, *args)`` for every rank, each alone in a process over the fake
    meta-only group (no data moves); the collectives they issue are checked as a whole."""
    return _run(fn, world_size, range(world_size), None, args, timeout, check_order)


def collective_logs(fn, world_size: int, *args, fake: bool = False, timeout: float = 180.0) -> dict:
    """Run as :func:`run_distributed` (or :func:`run_fake_ranks`) without the order check and
    return every rank's log of collectives, for a test that checks it itself."""
    port = None if fake else free_port()
    return dict(enumerate(_run(fn, world_size, range(world_size), port, args, timeout, False, logs=True)))


def _run(fn, world_size: int, ranks, port: int | None, args: tuple, timeout: float, check_order: bool,
         logs: bool = False) -> list:
    ctx = mp.get_context("fork")
    ranks = list(ranks)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out, args)) for r in ranks]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs):
            failed = any(p.exitcode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                time.sleep(0.5 if failed else 0)  # let the failing rank finish writing
                for p in procs:
                    if p.is_alive():
                        p.kill()
                break
            time.sleep(0.02)
        for p in procs:
            p.join()
        records = {r: torch.load(out / f"{r}.pt", weights_only=False)
                   for r in ranks if (out / f"{r}.pt").exists()}
        errors = [f"rank {r} of {world_size} failed:\n{rec['error']}" for r, rec in records.items()
                  if not rec["ok"]]
        if errors:
            raise AssertionError("\n".join(errors))
        missing = [r for r in ranks if r not in records]
        if missing:
            codes = [procs[ranks.index(r)].exitcode for r in missing]
            raise AssertionError(f"ranks {missing} of {world_size} produced no result (exit codes "
                                 f"{codes}; timeout {timeout}s?)")
        if logs:
            return [records[r]["log"] for r in ranks]
        if check_order:
            check_collective_order({r: records[r]["log"] for r in ranks})
        return [records[r]["result"] for r in ranks]
