"""One rank of a shared-device check (section ``shared_gpu``): W processes on *one* GPU, over gloo.

NCCL refuses two ranks on one GPU, but gloo carries CUDA tensors through its own streams, so the
engine's distributed paths (the all-to-all exchange, the replica broadcasts of ``spread()``, teams,
the statistics' all-reduce, the plan check) run at W > 1 with every tensor on the device. The
optimizer is checked alone: every rank draws the same full gradients on the device each step
(seeded), takes its part (a DTensor shard as FSDP2 or HSDP holds it, or the whole tensor when
replicated as under DDP), and steps; a single-process MARSM on the full tensors is the reference.
Each configuration runs three times from the same weights (``overlap`` on, off, and on with
``timing=True``) and reports:

- the largest difference of this rank's part from the reference (fp32 Newton-Schulz), and
  whether the three runs are bitwise equal;
- device-to-host reads per step (``HostReads``: one expected);
- ``torch.cuda.max_memory_allocated`` during each step (flat after the first);
- every collective the rank issued in the steps (the parent checks them against NCCL's ordering
  rules with ``tests/helpers/collective_order.py``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from marsm_dist import MARSM
from marsm_dist.diagnostics import HostReads

STEPS = 5
RUNS = {"overlap": {"overlap": True}, "serial": {"overlap": False},
        "timing": {"overlap": True, "timing": True}}
D = 64
GPT = [s for _ in range(2) for s in [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)]]
SHAPES = {"fsdp2": GPT, "hsdp": GPT, "ddp": GPT, "teams": [(8 * D, D), (D, D)]}
OTHERS = [(100, D), (D,), (D,)]  # an embedding and two norms: the AdamW branch


def _placements(config: str, world: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    if config == "fsdp2":
        return init_device_mesh(device.type, (world,)), (Shard(0),)
    if config == "hsdp":
        return init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("replicate", "shard")), (
            Replicate(), Shard(0))
    return None, None


def _part(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's part of ``full``: a DTensor shard, or the tensor itself (replicated)."""
    if mesh is None:
        return full.clone()
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    local = full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))].clone()
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape,
                              stride=full.stride())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _grads(shapes, t: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(1000 + t)
    return [torch.randn(s, generator=gen, device=device) * 0.05 for s in shapes]


def _start(shapes, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(s, generator=gen, device=device) / math.sqrt(s[-1]) for s in shapes]


def _groups(params: list[torch.Tensor], n_matrices: int) -> list[dict]:
    return [{"params": params[:n_matrices], "use_marsm": True},
            {"params": params[n_matrices:], "use_marsm": False}]


def run(config: str, rank: int, world: int, device: torch.device) -> dict:
    """Step ``config`` three ways on this rank; the figures the parent judges."""
    from tests.helpers.collective_order import CollectiveLog

    shapes = SHAPES[config] + OTHERS
    n = len(SHAPES[config])
    mesh, placements = _placements(config, world, device)
    extra = {} if mesh is not None else {"process_group": dist.group.WORLD}
    if config == "teams":
        extra["ns_team_max"] = 4
    ref = [torch.nn.Parameter(t) for t in _start(shapes, device)]
    ref_opt = MARSM(_groups(ref, n), lr=0.02, ns_dtype=torch.float32)
    parts, reads, peaks, logs, stats = {}, {}, {}, {}, {}
    for label, options in RUNS.items():
        params = [torch.nn.Parameter(_part(t, mesh, placements)) for t in _start(shapes, device)]
        opt = MARSM(_groups(params, n), lr=0.02, ns_dtype=torch.float32, **extra, **options)
        reads[label], peaks[label], log = [], [], CollectiveLog()
        for t in range(STEPS):
            for p, g in zip(params, _grads(shapes, t, device), strict=True):
                p.grad = _part(g, mesh, placements)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            with log, HostReads() as counted:
                opt.step()
            reads[label].append(counted.count)
            peaks[label].append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
        parts[label] = [_local(p).detach().float().cpu() for p in params]
        logs[label] = log.events
        s = opt.last_step_stats
        engine = opt._step_map.distributor.engine
        stats[label] = {"bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received,
                        "owned_matrices": s.owned_matrices, "ms": s.milliseconds,
                        "teams": [list(t) for t in engine.plan.teams if t] if engine is not None else []}
    for t in range(STEPS):
        for p, g in zip(ref, _grads(shapes, t, device), strict=True):
            p.grad = g
        ref_opt.step()
    want = [_local(_part(p.detach(), mesh, placements)).float().cpu() for p in ref]
    base = parts["overlap"]
    return {
        "max_abs_diff_vs_single_process": max((a - b).abs().max().item()
                                              for a, b in zip(base, want, strict=True)),
        "bitwise_equal_overlap_serial_timing": all(
            torch.equal(a, b) for k in ("serial", "timing") for a, b in zip(base, parts[k], strict=True)),
        "host_reads_per_step": reads, "max_memory_allocated_per_step": peaks, "stats": stats,
        # Events as plain lists (JSON carries no dataclasses; the parent rebuilds them).
        "collectives": {k: [[e.group, list(e.ranks), e.op, repr(e.sig), e.splits] for e in v]
                        for k, v in logs.items()},
    }
