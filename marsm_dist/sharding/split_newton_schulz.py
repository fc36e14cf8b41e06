"""Newton-Schulz of one matrix split over a team of ranks, for matrices too large for one owner.

Where ranks outnumber matrices (Llama-3-70B at W=1024: 560 matrices), whole-matrix ownership leaves
ranks idle and the step waits for the largest matrix on one device. The quintic iteration splits
by columns of the wide orientation X (m x n, m <= n): with X = [X_1 ... X_k],

    S = X X^T = sum_j X_j X_j^T        (m x m: one all-reduce per iteration)
    X_j <- a X_j + (b S + c S^2) X_j   (each member on its own columns)

so each member does ``2 m^2 n / k + m^3`` multiply-adds per iteration instead of ``2 m^2 n + m^3``,
and the team moves one m x m matrix per iteration. The normalization needs the whole matrix's
Frobenius norm: one more all-reduce of a scalar. The iteration is the plain form's own loop
(:func:`marsm_dist.newton_schulz.newton_schulz_columns`); this module only supplies the all-reduce.
The result is the plain form's, up to the order of the Gram sums (tested against it in float32 and
float64).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..newton_schulz import NS_COEFFICIENTS, NS_EPS, Reduce, newton_schulz_columns
from ..ns_coefficients import Coefficients

__all__ = ["split_newton_schulz"]


def split_newton_schulz(
    block: Tensor, group: dist.ProcessGroup | None, steps: int = 5, *, dtype: torch.dtype = torch.bfloat16,
    coefficients: Coefficients = NS_COEFFICIENTS, eps: float = NS_EPS,
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
    return newton_schulz_columns(block, steps, reduce=_team_sum(group), dtype=dtype,
                                 coefficients=coefficients, eps=eps)


def _team_sum(group: dist.ProcessGroup | None) -> Reduce | None:
    """The all-reduce over ``group``; None (nothing to sum) for a team of one."""
    if group is None or dist.get_world_size(group) == 1:
        return None

    def reduce(t: Tensor) -> Tensor:
        dist.all_reduce(t, group=group)
        return t

    return reduce
