"""Pick MARS-M's Newton-Schulz dtype for ``--ns-dtype auto``: bf16 only where it is fast.

bf16 NS is the usual choice on GPUs and on CPUs with native bf16 matmuls (AVX512-BF16, AMX),
where it runs 3-5x faster than fp32. On a CPU without them (AVX2 only) torch emulates bf16
matmuls and they run 10-30x *slower* than fp32 (measured: a 512x128 @ 128x512 product takes
52 ms in bf16 and about 2 ms in fp32 on an AVX2 EPYC). A short timing decides instead of a list
of CPU flags, and every rank adopts the slowest rank's verdict, because the ranks exchange NS
inputs in that dtype and must agree on it.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def _seconds(a: torch.Tensor, reps: int = 3) -> float:
    a @ a  # warm-up: the first call picks a kernel
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls are at least as fast as fp32 ones on ``device`` (here, now)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    a = torch.randn(256, 256)
    return _seconds(a.bfloat16()) <= _seconds(a)


def resolve_ns_dtype(requested: str, device: torch.device) -> str:
    """``requested`` unless it is ``"auto"``; then bf16 if every rank finds it fast, else fp32."""
    if requested != "auto":
        return requested
    fast = torch.tensor([1 if bf16_is_fast(device) else 0], device=device)
    if dist.is_initialized():
        dist.all_reduce(fast, op=dist.ReduceOp.MIN)
    return "bfloat16" if fast.item() else "float32"
