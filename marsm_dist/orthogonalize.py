"""Orthogonalize many momentum tensors at once: same-shape matrices share one batched NS call."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import update_scale
from .newton_schulz import newton_schulz

__all__ = ["NSConfig", "matrix_view_shape", "orthogonalize", "scale_for"]


@dataclass(frozen=True)
class NSConfig:
    """How one tensor is orthogonalized.

    Attributes:
        steps: Newton-Schulz iterations.
        dtype: compute dtype of the iteration.
        coefficients: the quintic's ``(a, b, c)``.
        flatten: for tensors with more than 2 dims, reshape to ``(dim0, rest)`` first (the common
            Muon convention) instead of the spec's batch-of-trailing-matrices semantics.
    """

    steps: int
    dtype: torch.dtype
    coefficients: tuple[float, float, float]
    flatten: bool = False


def matrix_view_shape(shape: torch.Size | tuple[int, ...], flatten: bool) -> tuple[int, ...]:
    """The shape NS sees: unchanged for 2-D (and for >2-D by default), ``(dim0, rest)`` if flattened."""
    if len(shape) > 2 and flatten:
        rest = 1
        for d in shape[1:]:
            rest *= d
        return (shape[0], rest)
    return tuple(shape)


def scale_for(shape: torch.Size | tuple[int, ...], flatten: bool) -> float:
    """The update scale 0.2 * sqrt(max(A, B)) for a tensor of ``shape`` under ``flatten``."""
    return update_scale(matrix_view_shape(shape, flatten))


def orthogonalize(tensors: list[Tensor], configs: list[NSConfig]) -> list[Tensor]:
    """Return NS(t) for each tensor (in its config's compute dtype and the tensor's shape).

    Plain matrices (2-D, or flattened >2-D) with the same shape and config are stacked and run as
    one batch. A >2-D tensor under the spec's default semantics is a batch over its trailing two
    dims normalized by its whole-tensor norm, so it runs on its own.
    """
    out: list[Tensor | None] = [None] * len(tensors)
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i, (t, cfg) in enumerate(zip(tensors, configs, strict=True)):
        view = matrix_view_shape(t.shape, cfg.flatten)
        if len(view) == 2:
            batches[(view, cfg)].append(i)
        else:
            out[i] = newton_schulz(
                t, cfg.steps, dtype=cfg.dtype, coefficients=cfg.coefficients, norm_over="tensor"
            )
    for (view, cfg), idx in batches.items():
        # Convert while stacking: one pass per matrix instead of a copy and then a cast.
        stacked = torch.empty((len(idx), *view), dtype=cfg.dtype, device=tensors[idx[0]].device)
        for j, i in enumerate(idx):
            stacked[j].copy_(tensors[i].reshape(view))
        result = newton_schulz(
            stacked, cfg.steps, dtype=cfg.dtype, coefficients=cfg.coefficients, norm_over="matrix"
        )
        for j, i in enumerate(idx):
            out[i] = result[j].reshape(tensors[i].shape)
    return out  # type: ignore[return-value]
