"""Dist-checkpointing of :class:`~.sharded.ShardedMARSMOptimizer`: each rank writes its own ranges.

A data-parallel (DP) rank holds a flat range ``[start, stop)`` of every (TP-local) parameter's
state. It saves that range, and nothing else, as pieces of the same global tensors the
non-distributed MARS-M optimizer saves (key ``optimizer.state.<state key>.<model key>``, the
parameter's global shape), so a checkpoint loads at any TP/DP size and into either optimizer:
dist-checkpointing reads any box of a global tensor from whichever boxes were written.

megatron-core 0.16.1 refuses ``ShardedTensor.flattened_range`` ("not supported"), which its own
distributed optimizer used for exactly this. So a flat range is cut into the few rectangular boxes
it covers instead (for a 2-D tensor: the end of its first row, whole rows, the start of its last
row), each an ordinary ``ShardedTensor`` whose data is a view of the live state. No rank builds a
full-shape tensor: a save hands the writer views, and a load copies the pieces read into the live
state. Within a DP group (what Megatron-LM's fully parallel save/load wrappers split the work
over) the ranks' pieces are disjoint; those wrappers are not tested here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map
from torch import Tensor

from ...sharding.layout import flat_overlap
from .routing import match_param_groups

__all__ = ["flat_range_boxes", "flat_range_pieces", "load_flat_state", "sharded_flat_state"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, size) inside a tensor
# The fp32 master weights of bf16/fp16 parameters, under the name Megatron's Float16 optimizers use,
# so that the replicated MARS-M optimizer (Float16OptimizerWithFloat16Params) reads them too.
MASTER = "fp32_param"


class FlatShard(Protocol):
    """This rank's flat range ``[start, stop)`` of one parameter and its fp32 copy (``main``)."""

    name: str
    param: Tensor
    main: Tensor

    @property
    def start(self) -> int: ...

    @property
    def stop(self) -> int: ...

    def model_range(self, t: Tensor) -> Tensor: ...


class ShardedOptimizer(Protocol):
    """What this module reads of :class:`~.sharded.ShardedMARSMOptimizer`. A protocol, not an import:
    that module imports this one, and the modules of this package form no circle."""

    optimizer: torch.optim.Optimizer  # the MARSM that steps the main shards
    config: Any  # Megatron's OptimizerConfig
    init_state_fn: Callable[..., Any]

    @property
    def shards(self) -> Sequence[FlatShard]: ...

    def _extract_common_per_param_step(self, state_dict: dict[str, Any]) -> Any: ...


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """The boxes that together are the flat range ``[start, stop)`` of a row-major ``shape``.

    In flat order; each box is contiguous in the flattening, and there are at most
    ``2 * len(shape) - 1`` of them.
    """
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])

    def in_row(row: int, a: int, b: int) -> list[Box]:
        return [((row, *o), (1, *z)) for o, z in flat_range_boxes(shape[1:], a, b)]

    first, last = start // inner, stop // inner
    if first == (stop - 1) // inner:  # inside one row
        return in_row(first, start - first * inner, stop - first * inner)
    boxes, whole = [], first
    if start % inner:
        boxes += in_row(first, start % inner, inner)
        whole += 1
    if last > whole:
        boxes.append(((whole,) + (0,) * (len(shape) - 1), (last - whole, *shape[1:])))
    if stop % inner:
        boxes += in_row(last, 0, stop % inner)
    return boxes


def _dp_main(replica_id: Any, name: str) -> tuple[int, ...]:
    """The model's (PP, TP, DP) replica id with DP 0: DP ranks hold different ranges, no copies."""
    if not (isinstance(replica_id, tuple) and len(replica_id) == 3):
        raise NotImplementedError(f"{name}: expected Megatron's (PP, TP, DP) replica_id, got {replica_id!r}")
    return (*replica_id[:2], 0)


def _targets(entry: ShardedTensor | ShardedTensorFactory, prefix: str,
             replica_id: tuple[int, ...]) -> list[tuple[ShardedTensor, int, int]]:
    """Global tensors that the model entry's local tensor is made of, each with its flat ``[lo, hi)``.

    A plain entry is one. A factory (e.g. SwiGLU's fc1: the W and V halves of the local tensor go
    to different places) is asked to cut a meta stand-in of the local tensor, which costs no memory;
    each part must be a contiguous view of it, so that it is a flat range of the local tensor.
    """
    key = f"{prefix}.{entry.key}"
    if isinstance(entry, ShardedTensor):
        return [(replace(entry, key=key, data=None, replica_id=replica_id), 0, math.prod(entry.local_shape))]
    probe = torch.empty(entry.data.shape, dtype=entry.data.dtype, device="meta")
    out = []
    for part in nested_values(entry.build_fn(key, probe, replica_id, None)):
        view = getattr(part, "data", None)
        if (not isinstance(part, ShardedTensor) or view is None or not (view is probe or view._base is probe)
                or not view.is_contiguous()):
            raise NotImplementedError(f"{entry.key}: its ShardedTensorFactory does not cut the tensor into "
                                      f"contiguous views; the distributed MARS-M optimizer cannot save it")
        out.append((part, view.storage_offset(), view.storage_offset() + view.numel()))
    return sorted(out, key=lambda t: t[1])


def flat_range_pieces(entry: ShardedTensor | ShardedTensorFactory, state: Tensor, start: int, stop: int,
                      prefix: str, keep_replicas: bool = True) -> list[ShardedTensor]:
    """``ShardedTensor`` pieces of ``state``, this rank's flat range ``[start, stop)`` of a parameter.

    ``entry`` is the parameter's entry in the model's sharded state dict. The pieces' data are views
    of ``state``, in its order. ``keep_replicas=False`` leaves out pieces that another TP rank also
    holds (a parameter replicated over TP): they are never written, and as TP ranks cut their
    buckets differently, a replica's box can start where the written one does with another size.
    """
    replica_id = _dp_main(entry.replica_id, entry.key)
    if not keep_replicas and any(replica_id):
        return []
    pieces, pos = [], 0
    for target, lo, hi in _targets(entry, prefix, replica_id):
        held = flat_overlap((lo, hi), (start, stop))
        if held is None:
            continue
        n = target.prepend_axis_num  # folded into the box: irregular pieces carry no prepended axes
        for offset, size in flat_range_boxes(target.local_shape, *held):
            shape = (1,) * n + size
            data = state[pos:pos + math.prod(size)].view(shape)
            pos += data.numel()
            where = target.global_offset[:n] + tuple(g + o for g, o in zip(target.global_offset[n:], offset,
                                                                             strict=True))
            pieces.append(ShardedTensor(target.key, data, data.dtype, shape, target.global_shape, where,
                                        None, target.replica_id, 0, target.allow_shape_mismatch))
    return pieces


def sharded_flat_state(opt: ShardedOptimizer, model_sharded_state_dict: Any,
                       is_loading: bool) -> dict[str, Any]:
    """MARSM's state dict with every state tensor replaced by its :func:`flat_range_pieces`.

    Laid out as the replicated MARS-M optimizer's: Megatron's ``FP32Optimizer`` (``state``,
    ``param_groups``) or, with fp16/bf16, ``Float16OptimizerWithFloat16Params`` (``optimizer``,
    ``fp32_from_fp16_params``). A load merges the loaded tensors into the data-less rest of the
    saving optimizer's state dict, which must therefore have the same paths.
    """
    sd = opt.optimizer.state_dict()  # the live tensors, not copies; their dicts are not changed below
    entries = get_param_id_to_sharded_param_map(model_sharded_state_dict, [s.param for s in opt.shards])
    # Ranks hold different numbers of pieces: {index: piece}, not a list, and no entry at all for a
    # parameter without pieces. Megatron saves rank 0's state dict less its pieces as the common
    # part: a list there must have the same length on every rank, an empty leaf must not meet a
    # tensor (the replicated optimizer's state) when it is merged, and every rank's must be equal.
    state: dict[Any, Any] = {}
    masters: dict[int, dict[int, ShardedTensor]] = {}
    for i, s in enumerate(opt.shards):
        if i not in entries:
            raise ValueError(f"{s.name or tuple(s.param.shape)} is not in the model's sharded state dict")
        if s.start == s.stop or (not is_loading and any(_dp_main(entries[i].replica_id, entries[i].key))):
            continue

        def pieces(t: Tensor, key: str, i: int = i, s: Any = s) -> dict[int, ShardedTensor]:
            return dict(enumerate(flat_range_pieces(entries[i], t.view(-1), s.start, s.stop,
                                                    f"optimizer.state.{key}", keep_replicas=is_loading)))

        state[i] = {k: pieces(v, k) if isinstance(v, Tensor) else v
                    for k, v in sd["state"].get(i, {}).items() if k != "step"}  # step: common_step
        if s.param.dtype != torch.float32:
            masters[i] = pieces(s.main, MASTER)
    step = opt._extract_common_per_param_step(sd)  # Megatron's check: one step for all
    if step is not None:
        state["common_step"] = step
    out: dict[str, Any] = {"state": state,
                           "param_groups": [{**g, "params": LocalNonpersistentObject(g["params"])}
                                            for g in sd["param_groups"]]}
    if opt.config.fp16 or opt.config.bf16:
        out = {"optimizer": out}
    if masters:
        out["fp32_from_fp16_params"] = masters
    return out


def load_flat_state(opt: ShardedOptimizer, sd: dict[str, Any]) -> None:
    """Load a :func:`sharded_flat_state` that dist-checkpointing filled in, into the live state."""
    masters = sd.get("fp32_from_fp16_params", {})
    sd = sd.get("optimizer", sd)
    step = sd["state"].pop("common_step", None)
    opt.init_state_fn(opt.optimizer, opt.config)  # every live tensor exists: pieces are copied in
    state = {}
    for i, s in enumerate(opt.shards):
        live, saved = opt.optimizer.state[s.main], dict(sd["state"].get(i, {}))
        if i in masters:
            saved[MASTER] = masters[i]
        for key, value in saved.items():
            if not isinstance(value, dict):
                live[key] = value
                continue
            flat, pos = (s.main if key == MASTER else live[key]).view(-1), 0
            for _, piece in sorted(value.items()):  # flat_range_pieces' order: consecutive parts
                flat[pos:pos + piece.numel()].copy_(piece.reshape(-1))
                pos += piece.numel()
            if pos != flat.numel():
                raise ValueError(f"{s.name}: the checkpoint gave {pos} of {flat.numel()} elements of {key}")
        expected = [k for k, v in live.items() if isinstance(v, Tensor) and k != "step"]
        expected += [MASTER] if s.param.dtype != torch.float32 else []
        missing = [k for k in expected if k not in saved]
        if s.stop > s.start and missing:
            raise ValueError(f"{s.name}: the loaded state has no {missing}")
        if MASTER not in saved:  # fp32 parameters are their own master weights
            s.main.copy_(s.model_range(s.param.detach()))
        entry = dict(live)
        if step is not None:
            entry["step"] = step.clone() if isinstance(step, Tensor) else torch.tensor(float(step))
        state[i] = entry
    groups = match_param_groups(opt.optimizer.param_groups, sd["param_groups"])
    opt.optimizer.load_state_dict({"state": state, "param_groups": groups})
