"""Newton-Schulz of one matrix split over a team of ranks, for matrices too large for one owner.

Where ranks outnumber matrices (Llama-3-70B at W=1024: 560 matrices), whole-matrix ownership leaves
ranks idle and the step waits for the largest matrix on one device. The quintic iteration splits
by columns of the wide orientation X (m x n, m <= n): with X = [X_1 ... X_k],

    S = X X^T = sum_j X_j X_j^T        (m x m: one all-reduce per iteration)
    X_j <- a X_j + (b S + c S^2) X_j   (each member on its own columns)

so each member does ``2 m^2 n / k + m^3`` multiply-adds per iteration instead of ``2 m^2 n + m^3``,
and the team moves one m x m matrix per iteration. The normalization needs the whole matrix's
Frobenius norm: one more all-reduce of a scalar. The result is the plain form's, up to the order of
the Gram sums (tested against it in float32 and float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..newton_schulz import NS_COEFFICIENTS, NS_EPS, _round, _rounding

__all__ = ["split_newton_schulz"]


def split_newton_schulz(
    block: Tensor, group: dist.ProcessGroup | None, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS,
) -> Tensor:
    """NS of the matrix whose column block (in the wide orientation, m x n_j) this rank holds.

    Args:
        block: this member's columns ``X_j`` of the wide orientation (m rows, m <= the full n).
        group: the team; its ranks' blocks, side by side, are the full matrix (None: a team of one).
        steps, dtype, coefficients, eps: as :func:`marsm_dist.newton_schulz.newton_schulz`.

    Returns:
        This member's columns of NS(X), in ``dtype``.

    The Gram partial sums are all-reduced in float32 (float64 for float64; in bf16, k partial
    roundings before the sum would add error the plain form does not have); each member then
    rounds S to ``dtype``, where the plain form's one product rounds.
    """
    if block.ndim != 2:
        raise ValueError(f"split_newton_schulz needs a 2-D block, got shape {tuple(block.shape)}")
    a, b, c = coefficients
    rnd = _rounding(dtype, block.device)  # bf16 emulated on CPUs without bf16 matmuls, as plain
    work = dtype if rnd is None else torch.float32
    X = block.to(dtype).to(work)
    acc = torch.float64 if work == torch.float64 else torch.float32  # what the sums travel in
    sq = X.to(acc).square().sum().reshape(1)
    _sum(sq, group)
    norm = _round(rnd, sq.sqrt().to(dtype).to(work))
    X = _round(rnd, X / _round(rnd, norm + eps))
    for _ in range(steps):
        S = torch.mm(X, X.mT).to(acc)
        _sum(S, group)
        S = _round(rnd, S.to(dtype).to(work))
        P = _round(rnd, torch.addmm(S, S, S, beta=b, alpha=c))  # b S + c S^2
        X = _round(rnd, torch.addmm(X, P, X, beta=a))  # a X + (b S + c S^2) X
    return X.to(dtype)


def _sum(t: Tensor, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
