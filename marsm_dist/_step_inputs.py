"""Gather and check what a step consumes, before anything is changed.

Every check here runs before the first write to a parameter or to optimizer state, so a refused
step (bad gradient, missing look-ahead) leaves both untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

Group = dict[str, Any]


@dataclass(eq=False)
class GroupWork:
    """The parameters of one group (and one branch) that have a gradient this step."""

    group: Group
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # positions in group["params"], for names


def param_name(param_groups: list[Group], group: Group, i: int) -> str:
    """The parameter's name if the optimizer was given names, else its position."""
    names = group.get("param_names")
    if names is not None:
        return repr(names[i])
    gi = next(k for k, g in enumerate(param_groups) if g is group)
    return f"param_groups[{gi}]['params'][{i}]"


def check_grad(param_groups: list[Group], group: Group, i: int, grad: Tensor) -> None:
    """Refuse gradient kinds MARS-M cannot take, naming the parameter."""
    if grad.is_sparse:
        raise RuntimeError(f"MARSM does not support sparse gradients ({param_name(param_groups, group, i)})")
    if torch.is_complex(grad):
        raise RuntimeError(f"MARSM does not support complex gradients ({param_name(param_groups, group, i)})")


def collect(
    param_groups: list[Group], uses_marsm: Callable[[Group, Tensor], bool]
) -> tuple[list[GroupWork], list[GroupWork]]:
    """Split the parameters that have a gradient into matrix and AdamW work, one per group."""
    matrix, adamw = [], []
    for group in param_groups:
        mw, aw = GroupWork(group), GroupWork(group)
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            check_grad(param_groups, group, i, p.grad)
            work = mw if uses_marsm(group, p) else aw
            work.params.append(p)
            work.grads.append(p.grad)
            work.indices.append(i)
        matrix.append(mw)
        adamw.append(aw)
    return matrix, adamw


def check_lookahead_ready(param_groups: list[Group], matrix: list[GroupWork], state: Mapping) -> None:
    """Exact mode: every matrix with a gradient needs a look-ahead stored since the last step."""
    for work in matrix:
        if work.group["approx"]:
            continue
        for p, i in zip(work.params, work.indices, strict=True):
            if not state[p].get("lookahead_ready", False):
                raise RuntimeError(
                    "MARSM(approx=False): no look-ahead gradient stored for "
                    f"{param_name(param_groups, work.group, i)} since the last step; call "
                    "store_lookahead_grad() after a backward pass on the next batch at the current "
                    "weights, before every step()"
                )


def first_nonfinite(
    param_groups: list[Group], matrix: list[GroupWork], adamw: list[GroupWork], state: Mapping
) -> str | None:
    """Describe the first NaN/Inf among the gradients this step consumes, or return None."""
    tensors, labels = [], []
    for work in matrix + adamw:
        tensors += work.grads
        labels += [("gradient", work.group, i) for i in work.indices]
    for work in matrix:
        if not work.group["approx"]:
            tensors += [state[p]["lookahead_grad"] for p in work.params]
            labels += [("look-ahead gradient", work.group, i) for i in work.indices]
    if not tensors:
        return None
    # The max-abs norm is NaN/Inf exactly when the tensor holds one; it never overflows.
    finite = torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf"))).float())
    if bool(finite.all()):
        return None
    bad = int((~finite).nonzero()[0])
    kind, group, i = labels[bad]
    return f"{kind} of {param_name(param_groups, group, i)} (shape {tuple(tensors[bad].shape)})"


def nonfinite_flag(tensors: list[Tensor]) -> Tensor:
    """A float64 vector of one element: 0 if every tensor is finite, NaN otherwise.

    Summed with other per-step statistics (one all-reduce when sharded), the NaN survives.
    """
    if not tensors:
        return torch.zeros(1, dtype=torch.float64)
    # The max-abs norm is NaN/Inf exactly when the tensor holds one; it never overflows.
    worst = torch.stack(torch._foreach_norm(tensors, float("inf"))).double().amax()
    return (worst * 0.0).reshape(1)


def describe_overflow(param_groups: list[Group], matrix: list[GroupWork], stats: Tensor) -> str:
    """Name the matrix whose c_t overflowed float32 although its gradient is finite."""
    i = int((~torch.isfinite(stats[:-1])).nonzero()[0])
    for work in matrix:
        if i < len(work.params):
            return f"c_t of {param_name(param_groups, work.group, work.indices[i])} (overflow)"
        i -= len(work.params)
    return "gradient of a parameter held by another rank"
