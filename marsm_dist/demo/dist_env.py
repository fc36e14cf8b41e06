"""This process's place in the run: rank, world size, device and backend, read from the environment.

Every way the demo is started ends up here with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set: torchrun and the deepspeed launcher set them, the demo's
own fork/spawn launcher sets them per child, and ``marsm_dist.demo.mpi`` fills them from MPI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .data import share


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and device of this process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 prints and writes files; the others stay quiet."""
        return self.rank == 0

    def slice(self, batch: tuple[torch.Tensor, torch.Tensor], part: int | None = None,
              parts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Share ``part`` of ``parts`` (default: this rank's of the world size) of a global batch,
        on this rank's device."""
        x, y = share(batch, self.rank if part is None else part, self.world_size if parts is None else parts)
        return x.to(self.device), y.to(self.device)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all ranks (gloo has no AVG all-reduce: sum, then divide)."""
        t = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def synchronize(self) -> None:
        """Wait for queued GPU work, so wall-clock timings measure it (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def launched() -> bool:
    """Whether a launcher already made this process one rank of a run."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class TooFewGPUsError(RuntimeError):
    """More ranks on this machine than visible CUDA GPUs; the message says what to do."""


def local_world_size_from_env() -> int | None:
    """Ranks on this machine as the launcher reports them (torchrun and ``marsm_dist.demo.mpi`` set
    ``LOCAL_WORLD_SIZE``, the deepspeed launcher ``LOCAL_SIZE``), or None if it does not say."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def cuda_device_index(local_rank: int, local_world_size: int | None, device_count: int) -> int:
    """The CUDA device of local rank ``local_rank``: its own GPU, ``cuda:local_rank``.

    Raises :class:`TooFewGPUsError` if this machine's ranks (``local_world_size``; when unknown,
    at least ``local_rank + 1``) outnumber its ``device_count`` GPUs. Why not share: two ranks on
    one GPU make NCCL refuse the communicator ("Duplicate GPU detected") or hang in the first
    collective, long after the cause.
    """
    needed = local_world_size if local_world_size is not None else local_rank + 1
    needed = max(needed, local_rank + 1)
    if needed > device_count:
        raise TooFewGPUsError(
            f"{needed} ranks on this machine but {device_count} CUDA GPU(s) visible: each rank needs a "
            f"GPU of its own. Start at most {device_count} rank(s) per machine (--world-size "
            f"{max(device_count, 1)} for python -m marsm_dist.demo, NUM_PROCS={max(device_count, 1)} for "
            "the launch/ scripts), or make more GPUs visible (CUDA_VISIBLE_DEVICES).")
    return local_rank


def check_gpus(world_size: int) -> None:
    """Refuse up front, before any process group, to run more ranks on this machine than it has
    GPUs: under a launcher for this rank's machine, else for the ``world_size`` ranks this process
    is about to start (so the message comes once, not from every rank). No-op without CUDA."""
    if not torch.cuda.is_available():
        return
    if launched():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        cuda_device_index(local_rank, local_world_size_from_env(), torch.cuda.device_count())
    else:
        cuda_device_index(world_size - 1, world_size, torch.cuda.device_count())


def init_from_env(threads: int | None = None) -> DistEnv:
    """Join the process group described by the environment: NCCL on GPUs (one per local rank,
    :func:`cuda_device_index`), else gloo."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = local_world_size_from_env()
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores: more threads than cores makes every rank slower.
        threads = max(1, (os.cpu_count() or 1) // (local_world or world))
    if threads is not None:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        # Checked before init_process_group: NCCL would fail or hang on a shared GPU.
        device = torch.device("cuda", cuda_device_index(local_rank, local_world, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=5))
    return DistEnv(rank, world, local_rank, device)
