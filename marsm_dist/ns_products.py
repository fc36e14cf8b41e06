"""The matrix products of the Newton-Schulz iteration (marsm_dist/newton_schulz.py).

``X X^T`` is symmetric, so on a CPU it is formed from row blocks: the two diagonal blocks and one
off-diagonal block, the other mirrored, 3/4 of the multiply-adds (:func:`gram_product`). Measured
(``python benchmarks/ns_kernels.py``, bf16, AVX-512-BF16 EPYC): a whole 5-iteration
Newton-Schulz 1.07-1.12x faster at 1 thread on GPT-2-small's 768 x {768, 2304, 3072} and
1.02-1.18x at 2, with the same bits as the full product there (each element is the same dot
product). Not on GPUs, where the batched products run as one kernel and the blocked form has not
been measured; nor below :data:`SYMMETRIC_MIN_ROWS` rows, where the extra calls cost more than
they save.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SYMMETRIC_MIN_ROWS", "add_product", "gram_product", "sum_dtype", "symmetric_gram"]

#: X X^T of a 2-D X with at least this many rows, on a CPU, is formed by blocks (module doc).
SYMMETRIC_MIN_ROWS = 256


def add_product(base: Tensor, m1: Tensor, m2: Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """``beta * base + alpha * m1 @ m2`` for matrices (addmm) or batches of them (baddbmm)."""
    if base.ndim == 2:
        return torch.addmm(base, m1, m2, beta=beta, alpha=alpha)
    return torch.baddbmm(base, m1, m2, beta=beta, alpha=alpha)


def sum_dtype(work: torch.dtype) -> torch.dtype:
    """The dtype sums over a team travel in: float32 (float64 for float64). In bf16, k partial
    roundings before the sum would add error that the whole matrix's one product does not have."""
    return torch.float64 if work == torch.float64 else torch.float32


def symmetric_gram(x: Tensor) -> Tensor:
    """X X^T of a 2-D ``x`` from its row blocks: both diagonal blocks and the upper one, mirrored."""
    h = x.shape[0] // 2
    top, bottom = x[:h], x[h:]
    out = torch.empty(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    torch.mm(top, top.mT, out=out[:h, :h])
    torch.mm(bottom, bottom.mT, out=out[h:, h:])
    torch.mm(top, bottom.mT, out=out[:h, h:])
    out[h:, :h].copy_(out[:h, h:].mT)
    return out


def gram_product(x: Tensor) -> Tensor:
    """X X^T: by blocks for a large 2-D ``x`` on a CPU (module doc), else one product."""
    if x.ndim == 2 and x.device.type == "cpu" and x.shape[0] >= SYMMETRIC_MIN_ROWS:
        return symmetric_gram(x)
    return x @ x.mT
