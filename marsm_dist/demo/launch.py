"""Start the demo's ranks from a plain ``python -m marsm_dist.demo``: one child process per rank.

Children are forked on the CPU (about 1 s per start instead of several for a fresh interpreter)
and spawned when CUDA is available (a forked child cannot use a CUDA context its parent may
have touched). Each child gets the same environment a launcher would give it, so from there on
the code path is the one torchrun and mpirun take.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from .worker import run_worker


def free_port() -> int:
    """A TCP port that is free on this machine now (rank 0's store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_worker(args)


def spawn(args: argparse.Namespace, world_size: int, attempts: int = 2) -> int:
    """Run ``world_size`` ranks on this machine and wait; returns 0 if every rank succeeded.

    A rank killed by a signal (not a Python error: those print their traceback and fail at once)
    gets the whole run started again, ``attempts`` times in all. A rare SIGSEGV seen once in 28
    runs came from inside torch's runtime during a torch.optim.Muon run (see the README); the demo
    then restarts rather than losing the comparison. Results are only written at the end, so a
    restarted run leaves nothing half-written.
    """
    method = "spawn" if torch.cuda.is_available() else "fork"
    for attempt in range(1, attempts + 1):
        try:
            mp.start_processes(_child, args=(world_size, free_port(), args), nprocs=world_size,
                               join=True, start_method=method)
            return 0
        except mp.ProcessExitedException as err:
            # The failing rank printed its traceback; start_processes has stopped the others.
            print(f"marsm demo: {err}", file=sys.stderr)
            if err.signal_name is None or attempt == attempts:
                return 1
            print(f"marsm demo: rank {err.error_index} was killed by {err.signal_name}, not by an error in "
                  f"the training code; starting the run again ({attempt + 1} of {attempts})", file=sys.stderr)
    return 1
