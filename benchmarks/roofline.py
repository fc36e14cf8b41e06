"""The optimizer step's physical floor: what no implementation of one MARS-M step can beat here.

    floor = Newton-Schulz FLOPs / matmul rate  +  bytes the step must move / copy bandwidth

both rates measured in the same run, on the same device and thread count as the step they judge.

Newton-Schulz FLOPs: the least the plain iteration needs, 5 iterations of X X^T, S S and
(bS + cS^2) X on the wide (m, n) orientation, the two symmetric products counted at half (their
other triangle is a mirror): 2 (1.5 m^2 n + 0.5 m^3) per iteration (:func:`minimum_ns_flops`),
against 2 (2 m^2 n + m^3) for three full products (``newton_schulz_flops``). MARSM forms a CPU
X X^T from blocks, 3/4 of the full product, so counting full products would put a floor above
what it runs. Each matrix's FLOPs are divided by the
rate measured at its own shape (:func:`measure_matmul_rate`: one plain iteration's three products
on an (m, n) matrix, m <= n, best of k), so a small matrix is not judged by a large one's rate.
Where MARSM emulates bf16 (a CPU without bf16 matmul kernels) the bf16 floor uses the float32 rate:
torch's scalar bf16 fallback is not this machine's floor. The sum ns + memory assumes the two do
not overlap (the step runs its compute-bound products and its memory-bound passes one after the
other); max(ns, memory) would be the bound for a perfectly overlapped step.

Bytes the step must move, per element of each tensor (float32 parameters, gradients and state;
the derivation follows ../shared/spec/marsm-algorithm.md sections 3 and 9):

  MARS-M matrix parameter (state M and P; O = NS(M) in the NS dtype, 2 bytes in bf16, 4 in fp32):
    stats pass     read g, P           8   ||c||_F, c = g + kappa (g - P): the clip factor must be
                                           known before M can be written, so this is its own pass
    momentum pass  read g, P, M       12   c again, clipped; M <- beta M + (1 - beta) c
                   write M, P          8   P <- g (approximate mode: a copy of this step's g)
    NS input       read M              4   (the products' own traffic is in the matmul rate)
    apply          read W, O; write W  8 + O   W <- W (1 - lr wd) - lr s O
                                      ---
                                      42 B in bf16 (44 B with float32 Newton-Schulz)
  A count of one read of g, P, M, W and one write of P, M, W (7 x 4 = 28 B) leaves out the norm
  pass over g and P (8 B), the NS read of M (4 B) and the read of O (2 B).

  AdamW parameter (state m, v): read g, m, v, W (16 B), write m, v, W (12 B) = 28 B.

Copy bandwidth (:func:`measure_copy_bandwidth`): a float32 ``dst.copy_(src)`` far larger than the
caches, counted as 2 x 4 bytes per element (one read, one write), best of k. On a CPU the copy also
reads ``dst`` into the cache before writing it (write-allocate), so in-place passes, which most of
the step's are, reach more than this figure (``x.mul_(1.0)``: about 1.8x on a 2-core EPYC, one
thread): there the memory term errs on the safe side (a few percent of the floor at GPT-2 shapes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from marsm_dist.newton_schulz import emulates_bfloat16

NS_STEPS = 5
ADAMW_BYTES = 28  # read g, m, v, W; write m, v, W (float32)
# (pass, bytes per element) of one MARS-M matrix element, float32 parameter and state; the read
# of O is added by marsm_bytes_per_element (its size is the Newton-Schulz dtype's).
MARSM_PASSES = (("stats: read g, P", 8), ("momentum: read g, P, M", 12), ("momentum: write M, P", 8),
                ("NS input: read M", 4), ("apply: read W, write W", 8))
Shape = tuple[int, ...]


def marsm_bytes_per_element(ns_dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """The passes of one MARS-M matrix element and their bytes (module doc), the read of O included."""
    size = torch.empty((), dtype=ns_dtype).element_size()
    return dict(MARSM_PASSES) | {f"apply: read O ({str(ns_dtype).replace('torch.', '')})": size}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: str | torch.device, repeats: int = 5,
                 inner: int = 1) -> float:
    """Seconds per call of ``fn``: the best of ``repeats`` timings of ``inner`` calls, after one warm-up."""
    device = torch.device(device)
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def ns_key(shape: Sequence[int]) -> tuple[int, int]:
    """(m, n), m <= n: the Newton-Schulz problem of a matrix (a shape and its transpose are one)."""
    return (min(shape[-2:]), max(shape[-2:]))


def measure_matmul_rate(shapes: Sequence[Shape], dtype: torch.dtype, device: str | torch.device,
                        repeats: int = 5) -> dict[tuple[int, int], float]:
    """FLOP/s of one plain Newton-Schulz iteration's products (X X^T, S S, (m,m) x (m,n)) per
    distinct (m, n) in ``shapes``, in ``dtype`` on ``device``, best of ``repeats``."""
    device = torch.device(device)
    inner = 10 if device.type == "cuda" else 1
    gen = torch.Generator().manual_seed(0)
    rates = {}
    for m, n in sorted({ns_key(s) for s in shapes}):
        x = (torch.randn(m, n, generator=gen) / n**0.5).to(device, dtype)
        s = x @ x.mT

        def iteration(x: torch.Tensor = x, s: torch.Tensor = s) -> tuple[torch.Tensor, ...]:
            return x @ x.mT, s @ s, s @ x  # S = X X^T, S S, (b S + c S^2) X

        seconds = best_seconds(iteration, device, repeats, inner)
        rates[(m, n)] = 2 * (2 * m * m * n + m**3) / seconds
    return rates


def measure_copy_bandwidth(device: str | torch.device, numel: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a float32 ``dst.copy_(src)`` (2 x 4 bytes per element), best of ``repeats``;
    ``numel`` defaults to 2^25 on a CPU (128 MiB a tensor) and 2^28 on a GPU (1 GiB)."""
    device = torch.device(device)
    numel = numel or (2**28 if device.type == "cuda" else 2**25)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / best_seconds(lambda: dst.copy_(src), device, repeats)


def measure_rates(matrices: Sequence[Shape], device: str | torch.device,
                  dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> dict:
    """The matmul rates per NS dtype (bf16 from float32 where MARSM emulates bf16) and the copy
    bandwidth, ready for :func:`step_floor`."""
    out: dict = {"copy_bytes_per_s": measure_copy_bandwidth(device), "matmul_flops_per_s": {}}
    emulated = emulates_bfloat16(device)
    for dtype in dict.fromkeys(torch.float32 if dtype == torch.bfloat16 and emulated else dtype
                               for dtype in dtypes):
        out["matmul_flops_per_s"][dtype] = measure_matmul_rate(matrices, dtype, device)
    if emulated and torch.bfloat16 in dtypes:
        out["matmul_flops_per_s"][torch.bfloat16] = out["matmul_flops_per_s"][torch.float32]
    out["bf16_rate_from_float32"] = emulated
    return out


def minimum_ns_flops(shape: Sequence[int], steps: int = NS_STEPS) -> float:
    """The FLOPs (2 per multiply-add) of ``steps`` plain iterations with the symmetric products X X^T
    and S S at half (module doc); a batch counts each matrix."""
    m, n = ns_key(shape)
    count = torch.Size(shape[:-2]).numel()
    return count * steps * 2 * (1.5 * m * m * n + 0.5 * m**3)


def step_floor(matrices: Sequence[Shape], others: Sequence[Shape], rates: dict[tuple[int, int], float],
               bandwidth: float, ns_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The floor of one MARS-M step over ``matrices`` (MARS-M) and ``others`` (AdamW): seconds of
    Newton-Schulz at ``rates`` (FLOP/s per :func:`ns_key`), bytes and their seconds at
    ``bandwidth`` (bytes/s), and their sum (module doc)."""
    per_elem = marsm_bytes_per_element(ns_dtype)
    n_mat = sum(torch.Size(s).numel() for s in matrices)
    n_rest = sum(torch.Size(s).numel() for s in others)
    flops = ns = 0.0
    for shape in matrices:
        f = minimum_ns_flops(shape)
        flops += f
        ns += f / rates[ns_key(shape)]
    moved = n_mat * sum(per_elem.values()) + n_rest * ADAMW_BYTES
    return {"ns_dtype": str(ns_dtype).replace("torch.", ""), "ns_flops": flops, "ns_seconds": ns,
            "bytes": moved, "marsm_bytes_per_element": per_elem, "adamw_bytes_per_element": ADAMW_BYTES,
            "memory_seconds": moved / bandwidth, "floor_seconds": ns + moved / bandwidth,
            "copy_gb_per_s": bandwidth / 1e9,
            "matmul_tflops": {f"{m}x{n}": r / 1e12 for (m, n), r in rates.items()}}


def floors(matrices: Sequence[Shape], others: Sequence[Shape], device: str | torch.device,
           dtypes: Sequence[torch.dtype] = (torch.bfloat16,)) -> dict[str, dict]:
    """Measure the rates and return :func:`step_floor` per NS dtype name ("bfloat16", "float32")."""
    measured = measure_rates(matrices, device, dtypes)
    out = {}
    for dtype in dtypes:
        floor = step_floor(matrices, others, measured["matmul_flops_per_s"][dtype],
                           measured["copy_bytes_per_s"], dtype)
        floor["rate_from_float32"] = dtype == torch.bfloat16 and measured["bf16_rate_from_float32"]
        out[floor["ns_dtype"]] = floor
    return out


def describe(floor: dict) -> str:
    """One line: the floor and its parts."""
    per = sum(floor["marsm_bytes_per_element"].values())
    rates = ", ".join(f"{k} {v:.3g}" for k, v in floor["matmul_tflops"].items())
    return (f"floor ({floor['ns_dtype']} NS) {1e3 * floor['floor_seconds']:.1f} ms = Newton-Schulz "
            f"{floor['ns_flops'] / 1e9:.1f} GFLOP in {1e3 * floor['ns_seconds']:.1f} ms (TFLOP/s per m x n: "
            f"{rates}{'; float32 rate, bf16 emulated' if floor.get('rate_from_float32') else ''}) + "
            f"{floor['bytes'] / 1e9:.3f} GB ({per} B/matrix element, {ADAMW_BYTES} B/AdamW element) "
            f"at {floor['copy_gb_per_s']:.1f} GB/s copy = {1e3 * floor['memory_seconds']:.1f} ms")
