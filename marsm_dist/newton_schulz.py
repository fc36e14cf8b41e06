"""Quintic Newton-Schulz orthogonalization (spec section 4).

The iteration keeps the singular vectors of its input and pushes the singular values towards 1
(after 5 steps most land in about [0.7, 1.2]; very small ones stay smaller). It approximates the
polar factor U V^T; it is not exact, and in bfloat16 no two implementations agree bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["NS_COEFFICIENTS", "NS_EPS", "newton_schulz", "newton_schulz_flops"]

# Coefficients of the quintic x -> a x + b x^3 + c x^5 and the normalization guard, as in Keller
# Jordan's Muon and the MARS-M reference implementation (AGI-Arena/MARS, MARS_M).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS: float = 1e-7


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    *,
    dtype: torch.dtype = torch.bfloat16,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    norm_over: Literal["matrix", "tensor"] = "matrix",
) -> Tensor:
    """Orthogonalize ``G`` with ``steps`` quintic Newton-Schulz iterations.

    Args:
        G: a matrix ``(A, B)`` or a batch ``(..., A, B)``; the last two dims are the matrix.
        steps: number of iterations (5 in the spec).
        dtype: compute dtype; the result is returned in it. bfloat16 is the reference's choice,
            float32 gives a reproducible result for tests.
        coefficients: ``(a, b, c)`` of the quintic.
        eps: added to the Frobenius norm before the input is normalized.
        norm_over: ``"matrix"`` normalizes every matrix of a batch by its own norm (a batch of
            independent matrices). ``"tensor"`` uses one norm over the whole tensor, which is
            how the spec treats a parameter with more than two dims.

    Returns:
        A tensor of ``G``'s shape in ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a tensor with at least 2 dims, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"Invalid ns_steps: {steps}")
    if norm_over not in ("matrix", "tensor"):
        raise ValueError(f"Invalid norm_over: {norm_over!r} (expected 'matrix' or 'tensor')")
    a, b, c = coefficients
    shape = G.shape
    X = G.to(dtype).reshape(-1, shape[-2], shape[-1])
    # Iterate on the wide orientation so the Gram matrix X X^T is the smaller of the two.
    transposed = shape[-2] > shape[-1]
    if transposed:
        X = X.mT
    if norm_over == "matrix":
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    else:
        norm = torch.linalg.vector_norm(X)
    X = X / (norm + eps)
    for _ in range(steps):
        S = X @ X.mT
        P = torch.baddbmm(S, S, S, beta=b, alpha=c)  # b S + c S^2
        X = torch.baddbmm(X, P, X, beta=a)  # a X + (b S + c S^2) X
    if transposed:
        X = X.mT
    return X.reshape(shape)


def newton_schulz_flops(shape: tuple[int, ...] | torch.Size, steps: int = 5) -> int:
    """Multiply-add FLOPs (2 per multiply-add) of :func:`newton_schulz` on a tensor of ``shape``."""
    *batch, rows, cols = shape
    n, m = min(rows, cols), max(rows, cols)
    count = 1
    for d in batch:
        count *= d
    # Per step: X X^T (n*n*m), S S (n^3), P X (n*n*m).
    return count * steps * 2 * (2 * n * n * m + n * n * n)
