"""Orthogonalize many momentum tensors at once: same-shape matrices share one batched NS call."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .lr_scale import LRScale, lr_scale_factor
from .newton_schulz import NSForm, newton_schulz
from .ns_coefficients import Coefficients

__all__ = ["NSConfig", "matrix_view_shape", "orthogonalize", "scale_for"]


@dataclass(frozen=True)
class NSConfig:
    """How one tensor is orthogonalized.

    Attributes:
        steps: Newton-Schulz iterations.
        dtype: compute dtype of the iteration.
        coefficients: the quintic's ``(a, b, c)``, one triple per iteration, or a preset's name
            (see :mod:`marsm_dist.ns_coefficients`; the optimizer passes the canonical tuple of
            triples, which is hashable).
        flatten: for tensors with more than 2 dims, reshape to ``(dim0, rest)`` first (the common
            Muon convention) instead of the spec's batch-of-trailing-matrices semantics.
        form: how the iteration is evaluated: ``"auto"``, ``"plain"`` or ``"gram"`` (see
            :func:`~marsm_dist.newton_schulz.newton_schulz`); the math is the same.
    """

    steps: int
    dtype: torch.dtype
    coefficients: Coefficients
    flatten: bool = False
    form: NSForm = "auto"


def matrix_view_shape(shape: torch.Size | tuple[int, ...], flatten: bool) -> tuple[int, ...]:
    """The shape NS sees: unchanged for 2-D (and for >2-D by default), ``(dim0, rest)`` if flattened."""
    if len(shape) > 2 and flatten:
        rest = 1
        for d in shape[1:]:
            rest *= d
        return (shape[0], rest)
    return tuple(shape)


def scale_for(shape: torch.Size | tuple[int, ...], flatten: bool, rule: LRScale = "mars_m") -> float:
    """The update scale s of a tensor of ``shape`` under ``flatten`` by the ``lr_scale`` rule
    (:mod:`marsm_dist.lr_scale`; the default is MARS-M's 0.2 * sqrt(max(A, B)))."""
    return lr_scale_factor(rule, matrix_view_shape(shape, flatten))


def orthogonalize(
    tensors: list[Tensor], configs: list[NSConfig], *, stack: bool | None = None
) -> list[Tensor]:
    """Return NS(t) for each tensor (in its config's compute dtype and the tensor's shape).

    On GPUs, plain matrices (2-D, or flattened >2-D) with the same config and the same shape up
    to a transpose are stacked in their wide orientation and run as one batch: NS(X^T) = NS(X)^T,
    as the iteration itself works on the wide orientation, so an (n, m) and an (m, n) matrix (a
    GPT MLP's two weights) share one call. On the CPU each matrix runs alone (faster there). A
    >2-D tensor under the spec's default semantics is a batch over its trailing two dims
    normalized by its whole-tensor norm, so it runs on its own. ``stack`` forces either way.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, (t, cfg) in enumerate(zip(tensors, configs, strict=True)):
        view = matrix_view_shape(t.shape, cfg.flatten)
        if len(view) == 2:
            batches[(min(view), max(view), cfg)].append(i)
        else:
            out[i] = newton_schulz(t, cfg.steps, dtype=cfg.dtype, form=cfg.form,
                                   coefficients=cfg.coefficients, norm_over="tensor")
    for (m, n, cfg), idx in batches.items():
        mats = [tensors[i].reshape(matrix_view_shape(tensors[i].shape, cfg.flatten)) for i in idx]
        # One at a time on the CPU: a stacked batch was measured slower from 128 x 64 up (the stack
        # costs a copy, and a batched CPU GEMM loops over the batch anyway; float32, 1 thread: 1.74x
        # at 128 x 64, 1.34x at 768 x 768). Tiny matrices (many MoE experts) would gain (512 of
        # 32 x 16: 0.36x float32, 0.06x bf16), but a batched GEMM rounds differently from a single
        # one, so a matrix's result would depend on which others its owner holds: replicated and
        # sharded runs then drift apart by bf16 ulps (tests/test_megatron.py's bf16 comparison).
        # On GPUs the batch saves launches and fills the device.
        if len(mats) > 1 and (stack if stack is not None else mats[0].device.type != "cpu"):
            results = _orthogonalize_stack(mats, m, n, cfg)
        else:
            results = [newton_schulz(mat, cfg.steps, dtype=cfg.dtype, coefficients=cfg.coefficients,
                                     form=cfg.form) for mat in mats]
        for i, o in zip(idx, results, strict=True):
            out[i] = o.reshape(tensors[i].shape)
    return out  # type: ignore[return-value]


def _orthogonalize_stack(mats: list[Tensor], m: int, n: int, cfg: NSConfig) -> list[Tensor]:
    """NS of matrices that are all (m, n) or (n, m), run as one (len, m, n) batch; the tall ones
    come back as transposed views."""
    # Convert while stacking: one pass per matrix instead of a copy and then a cast.
    stacked = torch.empty((len(mats), m, n), dtype=cfg.dtype, device=mats[0].device)
    tall = [mat.shape[0] > mat.shape[1] for mat in mats]
    for j, mat in enumerate(mats):
        stacked[j].copy_(mat.mT if tall[j] else mat)
    result = newton_schulz(stacked, cfg.steps, dtype=cfg.dtype, coefficients=cfg.coefficients,
                           norm_over="matrix", form=cfg.form)
    return [result[j].mT if is_tall else result[j] for j, is_tall in enumerate(tall)]
