"""Quintic Newton-Schulz orthogonalization (spec section 4).

The iteration keeps the singular vectors of its input and pushes the singular values towards 1
(after 5 steps most land in about [0.7, 1.2]; very small ones stay smaller). It approximates the
polar factor U V^T; it is not exact, and in bfloat16 no two implementations agree bit for bit.

Two evaluations of the same iteration are offered (``form``):

- ``"plain"``: the spec's loop, ``S = X X^T; X <- a X + (b S + c S^2) X``, on the wide
  orientation (m <= n): ``steps * (2 m^2 n + m^3)`` multiply-adds.
- ``"gram"``: every iterate is ``X_k = Q_k X_0`` with an m x m factor ``Q_k``, so the loop can run
  on m x m matrices only: with ``p_k = a I + b S_k + c S_k^2``, ``Q_{k+1} = p_k Q_k`` and
  ``S_{k+1} = X_{k+1} X_{k+1}^T = p_k S_k p_k`` (p_k is symmetric). ``X`` is formed once at the end
  of each segment of at most 3 steps, which then restarts from a fresh ``X X^T`` (for accuracy):
  ``2 m^2 n + (4 L - 3) m^3`` multiply-adds for a segment of L steps. With 5 steps that is 1.14x
  fewer than plain at an aspect ratio n/m of 2, 1.35x fewer at 3, 1.5x at 4 (GPT MLPs); more when square.

One loop runs both (``_iterations``). It also runs a matrix split by columns over a team of ranks
(:func:`newton_schulz_columns`), given a ``reduce`` that sums the partial ``X X^T`` over the team:
:mod:`marsm_dist.sharding.split_newton_schulz` passes an all-reduce, as this module knows no ranks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .ns_coefficients import NS_COEFFICIENTS, Coefficients, Schedule, coefficients_for_steps
from .ns_products import add_product, gram_product, sum_dtype

__all__ = ["NS_COEFFICIENTS", "NS_EPS", "NS_FORMS", "NSForm", "Reduce", "emulates_bfloat16", "newton_schulz",
           "newton_schulz_columns", "newton_schulz_flops", "resolve_form"]

# The normalization guard, as in Keller Jordan's Muon and the MARS-M reference (AGI-Arena/MARS,
# MARS_M); the coefficients and their schedules are in ns_coefficients.
NS_EPS: float = 1e-7

NSForm = Literal["auto", "plain", "gram"]
NS_FORMS: tuple[str, ...] = ("auto", "plain", "gram")

# The Gram form re-forms X = Q X_0 and restarts from a fresh X X^T after this many steps. Why: S is
# updated, not recomputed, so a rounding error in a tiny eigenvalue of S grows by about a^2 ~ 12
# per step. Measured on 256x768 / 128x512 matrices against a float64 plain evaluation (relative
# Frobenius error, float32), without vs with a restart after 3 steps (plain in brackets):
# Gaussian 2.2e-6 vs 2.5e-6 (2.0e-6); singular values 1..1e-4: 9.1e-5 vs 5.2e-6 (3.3e-6);
# rank 1: 3.1e-4 vs 1.2e-4 (7.2e-5). So float32 Gram with restarts is about as accurate as plain.
_GRAM_SEGMENT = 3

# "auto" takes the Gram form only where it is both accurate and clearly cheaper:
# - float32/float64 only. In bfloat16 it was measured 2-2.5x less accurate than the plain form on
#   Gaussian matrices whatever the restarts (rel. error 2.2e-2..2.8e-2 vs 1.1e-2 for plain, 256x768
#   and 128x512), and without restarts it diverges on rank-deficient input (rel. error 1e3 vs 1.6
#   for plain bf16 on a rank-1 matrix): bf16 rounding of S makes tiny eigenvalues negative and the
#   quintic then grows them without bound. So bf16 (the default) always runs the plain form.
# - at least _GRAM_MIN_DIM rows and columns: small matrices are bound by kernel launches (the Gram
#   form launches more, smaller products), not by FLOPs.
# - predicted FLOPs at most _GRAM_MAX_COST of the plain form's.
_GRAM_DTYPES = (torch.float32, torch.float64)
_GRAM_MIN_DIM = 128
_GRAM_MAX_COST = 0.85

# Set to False to run bfloat16 Newton-Schulz through torch's own CPU kernels (see _rounding).
EMULATE_CPU_BF16: bool = True


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    *,
    dtype: torch.dtype = torch.bfloat16,
    coefficients: Coefficients = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    norm_over: Literal["matrix", "tensor"] = "matrix",
    form: NSForm = "auto",
) -> Tensor:
    """Orthogonalize ``G`` with ``steps`` quintic Newton-Schulz iterations.

    Args:
        G: a matrix ``(A, B)`` or a batch ``(..., A, B)``; the last two dims are the matrix.
        steps: number of iterations (5 in the spec).
        dtype: compute dtype; the result is returned in it. bfloat16 is the reference's choice,
            float32 gives a reproducible result for tests.
        coefficients: ``(a, b, c)`` of the quintic, a list of one triple per iteration (the last
            repeats), or a preset's name (``"quintic"``, ``"polar_express"``); see
            :mod:`marsm_dist.ns_coefficients`.
        eps: added to the Frobenius norm before the input is normalized.
        norm_over: ``"matrix"`` normalizes every matrix of a batch by its own norm (a batch of
            independent matrices). ``"tensor"`` uses one norm over the whole tensor, which is
            how the spec treats a parameter with more than two dims.
        form: ``"plain"`` (the spec's loop), ``"gram"`` (the same iteration on the m x m Gram
            factor, see the module doc) or ``"auto"`` (Gram only where it is measured as accurate
            as plain and predicted cheaper; always plain in bfloat16). See :func:`resolve_form`.

    Returns:
        A tensor of ``G``'s shape in ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a tensor with at least 2 dims, got shape {tuple(G.shape)}")
    if steps < 0:
        raise ValueError(f"Invalid ns_steps: {steps}")
    if norm_over not in ("matrix", "tensor"):
        raise ValueError(f"Invalid norm_over: {norm_over!r} (expected 'matrix' or 'tensor')")
    schedule = coefficients_for_steps(coefficients, steps)
    shape = G.shape
    use_gram = resolve_form(form, shape, steps, dtype) == "gram"
    rnd = _rounding(dtype, G.device)
    work = dtype if rnd is None else torch.float32
    # One matrix stays 2-D: the 2-D products (mm/addmm) are measured faster than a batch of one
    # through bmm/baddbmm on CPUs with native bf16 (GPT-2-small shapes, bf16, 1 thread: 660 vs
    # 755 ms for 4 matrices; torch.optim.Muon's NS: 661 ms). A batch runs as (B, A, B) through bmm.
    X = G.reshape(-1, shape[-2], shape[-1]) if G.ndim > 2 else G
    X = X.to(dtype).to(work)
    # Iterate on the wide orientation so the Gram matrix X X^T is the smaller of the two: a
    # transposed view, as the products take either layout (a contiguous copy was measured 6% of
    # the iteration on 512x128, a strided copy; torch.optim.Muon does the same).
    transposed = shape[-2] > shape[-1]
    if transposed:
        X = X.mT
    batched = X.ndim > 2 and norm_over == "matrix"
    norm = _round(rnd, torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) if batched
                  else torch.linalg.vector_norm(X))
    denom = _round(rnd, norm + eps)
    # In place where X is already a copy (the input is never written).
    X = _round(rnd, X.div_(denom) if X.data_ptr() != G.data_ptr() else X / denom)
    X = _iterations(X, schedule, rnd, "gram" if use_gram else "plain")
    if transposed:
        X = X.mT
    return X.reshape(shape).to(dtype)


def newton_schulz_columns(
    block: Tensor, steps: int = 5, *, reduce: Reduce | None = None, dtype: torch.dtype = torch.bfloat16,
    coefficients: Coefficients = NS_COEFFICIENTS, eps: float = NS_EPS,
) -> Tensor:
    """This block's columns of NS(X), for ``X`` (m x n, m <= n) split by columns over a team.

    ``reduce(t)`` returns the sum of ``t`` over the team's blocks; every member calls it in the same
    order (the squared norm, then one m x m partial ``X X^T`` per step) with float32 tensors (float64
    for float64). ``None``: the block is the whole matrix. The plain form's result up to the order
    of the sums; the normalization sums squares, so it is not :func:`newton_schulz` bit for bit.
    """
    if block.ndim != 2:
        raise ValueError(f"split_newton_schulz needs a 2-D block, got shape {tuple(block.shape)}")
    rnd = _rounding(dtype, block.device)  # bf16 emulated on CPUs without bf16 matmuls, as plain
    work = dtype if rnd is None else torch.float32
    X = block.to(dtype).to(work)
    sq = X.to(sum_dtype(work)).square().sum().reshape(1)
    sq = sq if reduce is None else reduce(sq)
    norm = _round(rnd, sq.sqrt().to(dtype).to(work))
    X = _round(rnd, X / _round(rnd, norm + eps))
    return _iterations(X, coefficients_for_steps(coefficients, steps), rnd, "plain", reduce).to(dtype)


def resolve_form(form: str, shape: tuple[int, ...] | torch.Size, steps: int, dtype: torch.dtype) -> str:
    """The form (``"plain"`` or ``"gram"``) that :func:`newton_schulz` runs for these arguments."""
    if form not in NS_FORMS:
        raise ValueError(f"Invalid Newton-Schulz form: {form!r} (expected 'auto', 'plain' or 'gram')")
    if form != "auto":
        return form
    if dtype not in _GRAM_DTYPES:
        return "plain"
    m, n = sorted(shape[-2:])
    cheaper = _gram_macs(m, n, steps) <= _GRAM_MAX_COST * _plain_macs(m, n, steps)
    return "gram" if dtype in _GRAM_DTYPES and m >= _GRAM_MIN_DIM and cheaper else "plain"


def newton_schulz_flops(
    shape: tuple[int, ...] | torch.Size, steps: int = 5, *, form: str = "plain",
    dtype: torch.dtype = torch.bfloat16,
) -> int:
    """FLOPs (2 per multiply-add) of :func:`newton_schulz` on ``shape`` in ``form``.

    The default counts the plain form, which is what the sharding plan balances on.
    """
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = math.prod(batch)
    if resolve_form(form, shape, steps, dtype) == "gram":
        return count * 2 * _gram_macs(m, n, steps)
    return count * 2 * _plain_macs(m, n, steps)


def _plain_macs(m: int, n: int, steps: int) -> int:
    # Per step: X X^T (m*m*n), S S (m^3), P X (m*m*n).
    return steps * (2 * m * m * n + m**3)


def _gram_macs(m: int, n: int, steps: int) -> int:
    # Per segment of L steps: X X^T and Q X (m*m*n each); L squares S S, L - 1 products p Q and
    # L - 1 updates p S p (2 m^3 each).
    total, left = 0, steps
    while left > 0:
        seg = min(_GRAM_SEGMENT, left)
        total += 2 * m * m * n + (4 * seg - 3) * m**3
        left -= seg
    return total


Rounding = Callable[[Tensor], Tensor] | None
#: Sums a tensor over the ranks that share a matrix and returns the sum (may work in place).
Reduce = Callable[[Tensor], Tensor]


def emulates_bfloat16(device: torch.device | str = "cpu") -> bool:
    """True if bfloat16 Newton-Schulz on ``device`` runs float32 products rounded to bfloat16."""
    return _rounding(torch.bfloat16, torch.device(device)) is not None


def _round(rnd: Rounding, t: Tensor) -> Tensor:
    return t if rnd is None else rnd(t)


def _rounding(dtype: torch.dtype, device: torch.device) -> Rounding:
    """``None``, or how to emulate ``dtype`` on float32 tensors where that is much faster.

    Why: on an x86 CPU without native bfloat16 (no AVX-512, e.g. AVX2-only), torch's bfloat16
    matmul falls back to a scalar loop, measured 40-80x slower than float32 (a 768^3 product:
    0.9 s vs 11 ms). That fallback accumulates in float32 and rounds the result to bfloat16 once,
    so doing each product in float32 on the bfloat16 values and rounding every result to bfloat16
    keeps the same rounding points: measured bit-identical except ~1e-4 of the elements, one ulp
    apart (float32 summation order). Nothing changes on GPUs or on CPUs with bfloat16 support.
    """
    if not EMULATE_CPU_BF16 or dtype != torch.bfloat16 or device.type != "cpu" or _cpu_has_bf16_matmul():
        return None
    return _to_bf16_and_back


def _to_bf16_and_back(t: Tensor) -> Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


@functools.cache
def _cpu_has_bf16_matmul() -> bool:
    """True unless torch reports that oneDNN has no bfloat16 kernels on this CPU (then torch
    uses its scalar fallback). Unknown (another build) counts as True: no emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def _gram_matrix(X: Tensor, rnd: Rounding, reduce: Reduce | None) -> Tensor:
    """``X X^T`` of the whole matrix: of ``X`` itself, or the team's sum of its blocks' products."""
    S = gram_product(X)
    if reduce is not None:  # rounded once, after the sum, where the whole matrix's product rounds
        S = reduce(S.to(sum_dtype(X.dtype))).to(X.dtype)
    return _round(rnd, S)


def _iterations(X: Tensor, schedule: Schedule, rnd: Rounding, form: str,
                reduce: Reduce | None = None) -> Tensor:
    """One quintic iteration per triple of ``schedule`` on the normalized wide ``X`` (every form).

    ``"plain"`` is the spec's loop; ``"gram"`` the same iteration on the m x m factor Q with
    X_k = Q_k X (module doc). ``reduce`` (see :func:`newton_schulz_columns`) makes ``X`` a column
    block of a matrix split over a team: only ``X X^T`` needs the other blocks, and every other
    product is m x m or acts on this block's own columns.
    """
    if form == "plain":
        for a, b, c in schedule:
            S = _gram_matrix(X, rnd, reduce)
            P = _round(rnd, add_product(S, S, S, beta=b, alpha=c))  # b S + c S^2
            X = _round(rnd, add_product(X, P, X, beta=a))  # a X + (b S + c S^2) X
        return X
    for start in range(0, len(schedule), _GRAM_SEGMENT):
        segment = schedule[start:start + _GRAM_SEGMENT]
        S = _gram_matrix(X, rnd, reduce)
        Q: Tensor | None = None
        for k, (a, b, c) in enumerate(segment):
            base = _round(rnd, S * b)
            base.diagonal(dim1=-2, dim2=-1).add_(a)
            p = _round(rnd, add_product(_round(rnd, base), S, S, alpha=c))  # a I + b S + c S^2
            Q = p if Q is None else _round(rnd, p @ Q)
            if k < len(segment) - 1:
                S = _round(rnd, _round(rnd, p @ S) @ p)  # X_{k+1} X_{k+1}^T
        X = _round(rnd, Q @ X)
    return X
