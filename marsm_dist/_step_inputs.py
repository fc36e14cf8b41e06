"""Gather and check what a step consumes, before anything is changed.

Every check here runs before the first write to a parameter or to optimizer state, so a refused
step (bad gradient, missing look-ahead) leaves both untouched. All math runs on *local* tensors
(the shard this rank holds), obtained through each parameter's sharding adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .sharding.adapter import ShardingAdapter, Slot, slot_view

Group = dict[str, Any]


@dataclass(eq=False)
class GroupWork:
    """The slots of one group (and one branch) that take part in this step.

    A slot is one logical tensor inside a parameter container (see ``sharding.Slot``); entry
    ``j`` is slot ``slots[j]`` of container ``params[j]``. ``grads`` are local views, with zeros
    standing in for a sharded matrix that has no gradient on this rank (it still joins every
    collective); ``has_grad`` says which those are.
    """

    group: Group
    params: list[Tensor] = field(default_factory=list)
    adapters: list[ShardingAdapter] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    indices: list[tuple[int, int]] = field(default_factory=list)  # (param index in group, slot)
    local_params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    has_grad: list[bool] = field(default_factory=list)

    def add(self, p: Tensor, adapter: ShardingAdapter, slot: Slot, index: tuple[int, int]) -> None:
        self.params.append(p)
        self.adapters.append(adapter)
        self.slots.append(slot)
        self.indices.append(index)
        local = slot_view(adapter.local(p), slot)
        self.local_params.append(local)
        self.has_grad.append(p.grad is not None)
        grad = slot_view(adapter.local(p.grad), slot) if p.grad is not None else torch.zeros_like(local)
        self.grads.append(grad)

    def local_state(self, state: Mapping, key: str) -> list[Tensor]:
        return [slot_view(a.local(state[p][key]), s)
                for p, a, s in zip(self.params, self.adapters, self.slots, strict=True)]

    def containers(self) -> list[Tensor]:
        """The distinct parameter containers, in first-seen order."""
        return list({id(p): p for p in self.params}.values())


def param_name(param_groups: list[Group], group: Group, i: int | tuple[int, int],
               slot: Slot | None = None) -> str:
    """A parameter's (or slot's) name: the adapter's, the optimizer's names, or its position."""
    i, k = i if isinstance(i, tuple) else (i, 0)
    if slot is not None and slot.name is not None:
        return repr(slot.name)
    names = group.get("param_names")
    if names is not None:
        base = repr(names[i])
    else:
        gi = next(n for n, g in enumerate(param_groups) if g is group)
        base = f"param_groups[{gi}]['params'][{i}]"
    return base if slot is None or slot.numel < 0 else f"{base} slot {k}"


def check_grad(param_groups: list[Group], group: Group, i: int, grad: Tensor) -> None:
    """Refuse gradient kinds MARS-M cannot take, naming the parameter."""
    if grad.is_sparse:
        raise RuntimeError(f"MARSM does not support sparse gradients ({param_name(param_groups, group, i)})")
    if torch.is_complex(grad):
        raise RuntimeError(f"MARSM does not support complex gradients ({param_name(param_groups, group, i)})")


def matrix_dims(group: Group, slot: Slot) -> int:
    """The dims of the matrix ``slot`` is (or holds one of): in an ``experts`` group a tensor not
    yet split per expert has one dim fewer per matrix (its dim 0 counts experts)."""
    return len(slot.shape) - (1 if group.get("experts") and slot.expert is None else 0)


def routes_to_marsm(group: Group, slot: Slot) -> bool:
    """True if ``slot`` takes the matrix update in ``group`` (its ``use_marsm``, else >= 2 dims;
    in an ``experts`` group, >= 2 dims per expert: a per-expert bias ``(E, n)`` goes to AdamW)."""
    use = group["use_marsm"]
    return matrix_dims(group, slot) >= 2 if use is None else bool(use)


def collect(
    param_groups: list[Group],
    adapter_of: Callable[[Tensor], ShardingAdapter],
    slots_of: Callable[[Tensor], list[Slot]],
    always: Callable[[Tensor, int], bool],
) -> tuple[list[GroupWork], list[GroupWork]]:
    """Split every container's slots into matrix and AdamW work, one of each per group. A slot
    takes part when its container has a gradient, or when ``always(p, k)`` (sharded matrices:
    every rank must join the same collectives, whether or not its shard got a gradient)."""
    matrix, adamw = [], []
    for group in param_groups:
        mw, aw = GroupWork(group), GroupWork(group)
        for i, p in enumerate(group["params"]):
            if p.grad is not None:
                check_grad(param_groups, group, i, p.grad)
            for k, slot in enumerate(slots_of(p)):
                if 0 in slot.shape:  # nothing to update (and no matrix to orthogonalize)
                    continue
                is_matrix = routes_to_marsm(group, slot)
                if is_matrix and group.get("experts") and slot.expert is None and len(slot.shape) >= 2:
                    raise RuntimeError(
                        f"{param_name(param_groups, group, i)} has shape {slot.shape} and sits in a "
                        "use_marsm=True, experts=True group: dim 0 counts experts, so each expert is "
                        f"{len(slot.shape) - 1}-D, not a matrix. Put it in a group without "
                        "experts=True, or route it to AdamW.")
                if is_matrix and len(slot.shape) < 2:
                    raise RuntimeError(
                        f"{param_name(param_groups, group, i)} has shape {slot.shape} but sits in a "
                        "use_marsm=True group. If a framework flattened it (DeepSpeed ZeRO), import "
                        "marsm_dist.adapters.deepspeed before deepspeed.initialize.")
                if p.grad is None and not (is_matrix and always(p, k)):
                    continue
                (mw if is_matrix else aw).add(p, adapter_of(p), slot, (i, k))
        matrix.append(mw)
        adamw.append(aw)
    return [w for w in matrix if w.params], [w for w in adamw if w.params]


def check_lookahead_ready(param_groups: list[Group], matrix: list[GroupWork], state: Mapping) -> None:
    """Exact mode: every matrix taking part needs a look-ahead stored since the last step."""
    for work in matrix:
        if work.group["approx"]:
            continue
        for p, i, slot in zip(work.params, work.indices, work.slots, strict=True):
            if not state[p].get("lookahead_ready", False):
                raise RuntimeError(
                    "MARSM(approx=False): no look-ahead gradient stored for "
                    f"{param_name(param_groups, work.group, i, slot)} since the last step; call "
                    "store_lookahead_grad() after a backward pass on the next batch at the current "
                    "weights, before every step()"
                )


def pending_lookaheads(matrix: list[GroupWork], state: Mapping) -> list[Tensor]:
    """Local views of the look-ahead gradients that become P after this step (exact mode)."""
    return [t for w in matrix if not w.group["approx"] for t in w.local_state(state, "lookahead_grad")]


def nonfinite_flag(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A float64 vector of one element on ``device``: 0 if every tensor is finite, NaN otherwise.

    Summed with other per-step statistics (one all-reduce when sharded), the NaN survives. It
    stays on the device: the step reads it on the host together with everything else, once.
    """
    tensors = [t for t in tensors if t.numel()]  # an empty shard has no max (and is finite)
    if not tensors:
        return torch.zeros(1, dtype=torch.float64, device=device)
    # CPU fast path: the max-abs norm below is ~10x slower there than a 2-norm (122 ms vs 12 ms
    # for GPT-2's 50257x768 embedding gradient, 1 thread). A finite 2-norm proves every element
    # finite; only a non-finite one (NaN/Inf, or float32 overflow of the squares of entries above
    # ~1e19) needs the exact check. Not on GPUs: both run at memory speed, and reading the 2-norm
    # on the host would be a device sync.
    on_cpu = tensors[0].device.type == "cpu"
    if on_cpu and bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return torch.zeros(1, dtype=torch.float64, device=device)
    # The max-abs norm is NaN/Inf exactly when the tensor holds one; it never overflows.
    worst = torch.stack(torch._foreach_norm(tensors, float("inf"))).double().amax()
    return (worst * 0.0).reshape(1).to(device)


# The state a step reads, per branch: screened for NaN/Inf after a checkpoint was loaded.
_READ_STATE = {True: ("exp_avg", "last_grad"), False: ("exp_avg", "exp_avg_sq")}


def loaded_state(matrix: list[GroupWork], adamw: list[GroupWork], state: Mapping
                 ) -> list[tuple[str, GroupWork, list[Tensor]]]:
    """(key, work, local views) of every state tensor this step reads."""
    return [(key, work, work.local_state(state, key))
            for works, is_matrix in ((matrix, True), (adamw, False)) for work in works
            for key in _READ_STATE[is_matrix]]


def describe_nonfinite(
    param_groups: list[Group], matrix: list[GroupWork], adamw: list[GroupWork], state: Mapping,
    sq_norms: list[float], local_sq_norms: list[float], screened_state: bool = False,
) -> str:
    """Name what made this step's statistics non-finite: a local NaN/Inf gradient or look-ahead,
    loaded optimizer state (``screened_state``), a c_t that overflowed float32, or a shard that
    another rank holds."""
    def named(work: GroupWork) -> list[str]:
        return [param_name(param_groups, work.group, i, s) for i, s in zip(work.indices, work.slots,
                                                                           strict=True)]

    candidates = []
    for key, work, tensors in loaded_state(matrix, adamw, state) if screened_state else []:
        candidates += [(f"optimizer state {key!r} (from the loaded state dict: damaged?)", n, t)
                       for n, t in zip(named(work), tensors, strict=True)]
    for work in matrix + adamw:
        candidates += [("gradient", n, g) for n, g in zip(named(work), work.grads, strict=True)]
    for work in matrix:
        if not work.group["approx"]:
            looks = work.local_state(state, "lookahead_grad")
            candidates += [("look-ahead gradient", n, t) for n, t in zip(named(work), looks, strict=True)]
    for kind, name, t in candidates:
        if t.numel() and not bool(torch.isfinite(t).all()):
            return f"{kind} of {name} (shape {tuple(t.shape)})"
    names = [n for w in matrix for n in named(w)]
    what = "gradient or loaded optimizer state" if screened_state else "gradient"
    for k in [k for k, x in enumerate(sq_norms) if not math.isfinite(x)]:
        if math.isfinite(local_sq_norms[k]):
            return f"{what} shard of {names[k]} held by another rank"
        return f"c_t of {names[k]} (overflow)"
    return f"{what} of a parameter shard held by another rank"
