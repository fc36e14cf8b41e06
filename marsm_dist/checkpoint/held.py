"""What this rank holds of each named tensor of a MARS-M optimizer: the walk every checkpoint
path shares, framework-free (the sharding adapters describe each parameter's pieces).

A parameter container (a parameter, a DTensor, a ZeRO flat partition) holds one or more slots;
each slot is one original parameter, known by name. For every slot this rank holds elements of,
:func:`held_tensors` lists the boxes of the full tensor those elements are, so a state tensor's
part of that parameter can be written and read by box, at any sharding, without a gather.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._step_work import routes_to_marsm
from ..optimizer import MARSM
from ..sharding.adapter import Slot, adapter_for, slot_view
from .boxes import Box, piece_boxes

__all__ = ["BRANCH_KEYS", "HeldTensor", "find_marsm", "held_tensors", "marsm_in", "names_from_model",
           "names_through_wrappers", "register_inner", "register_master_sync", "register_param_aliases",
           "register_wrapper_view", "sync_model_params"]

#: The state tensors of each branch, as the neutral form keys them (``step`` is kept apart).
BRANCH_KEYS = {"marsm": ("exp_avg", "last_grad", "lookahead_grad"), "adamw": ("exp_avg", "exp_avg_sq")}

# Module wrappers that add a level to parameter names without changing the model: torch.compile,
# activation checkpointing and FSDP1 anywhere in the name, DDP (and Megatron's wrappers) as leading
# ``module.`` levels. A name is kept without them, so it is the plain model's.
_WRAPPER_LEVELS = {"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
_LEADING_WRAPPER = "module"

NameMap = Callable[[str], "str | None"]


@dataclass
class HeldTensor:
    """One named parameter (a slot of an optimizer's container) as this rank holds it."""

    name: str
    shape: tuple[int, ...]
    branch: str  # "marsm" or "adamw"
    group_index: int
    container: Tensor
    slot: Slot
    boxes: list[Box]

    def local(self, t: Tensor) -> Tensor:
        """This rank's elements of the slot inside container-shaped tensor ``t``, flat (a view:
        writes land in ``t``); a whole tensor with its own strides (``channels_last``) as it is."""
        local = slot_view(adapter_for(self.container).local(t), self.slot)
        if self.slot.numel < 0 and self.slot.layout is None and not local.is_contiguous():
            return local  # its one box is the whole tensor: read and written through its strides
        return local.view(-1)


# Wrapper -> a context in which the MARSM it holds lists all its parameters, or None. A framework
# whose wrapper hands the optimizer its parameters only inside a step (DeepSpeed's ZeRO-3) registers
# one (its adapter does, at install).
_VIEWS: list[Callable[[Any], contextlib.AbstractContextManager[Any] | None]] = []


def register_wrapper_view(view: Callable[[Any], contextlib.AbstractContextManager[Any] | None]) -> None:
    """Register ``view(wrapper)``: a context in which the ``MARSM`` under ``wrapper`` lists all its
    parameters in ``param_groups``, or None if ``wrapper`` is not the framework's (idempotent)."""
    if view not in _VIEWS:
        _VIEWS.append(view)


# Wrapper -> the wrapper or optimizer directly inside it, where ``.optimizer`` skips a level
# (Megatron's ChainedOptimizer hands out its inner wrapper's optimizer); None: use ``.optimizer``.
_INNER: list[Callable[[Any], Any]] = []


def register_inner(inner: Callable[[Any], Any]) -> None:
    """Register ``inner(wrapper)``: what ``wrapper`` directly wraps, or None (then ``.optimizer``)."""
    if inner not in _INNER:
        _INNER.append(inner)


def _chain(obj: Any) -> list[Any]:
    chain = [obj]
    while not isinstance(chain[-1], MARSM) and len(chain) < 6:
        inner = next((found for find in _INNER if (found := find(chain[-1])) is not None), None)
        if inner is None:
            inner = getattr(chain[-1], "optimizer", None)
        if inner is None:
            break
        chain.append(inner)
    return chain


@contextlib.contextmanager
def marsm_in(obj: Any) -> Iterator[MARSM]:
    """The ``MARSM`` inside ``obj`` (see :func:`find_marsm`), with every wrapper's registered view
    entered, so its ``param_groups`` list every parameter it holds state for."""
    chain = _chain(obj)
    opt = find_marsm(obj)
    with contextlib.ExitStack() as stack:
        for wrapper in chain[:-1]:
            for view in _VIEWS:
                context = view(wrapper)
                if context is not None:
                    stack.enter_context(context)
        yield opt


# Wrapper -> a function that copies the MARSM's parameters (the fp32 master weights) to the model's
# own (bf16 copies, all-gathered partitions), or None: for load_neutral(weights=True).
_SYNCS: list[Callable[[Any], Callable[[], None] | None]] = []


def register_master_sync(sync: Callable[[Any], Callable[[], None] | None]) -> None:
    """Register ``sync(wrapper)``: a function that refreshes the model's parameters from the
    master weights the ``MARSM`` under ``wrapper`` holds, or None for another framework's wrapper
    (idempotent). Called on every rank after the neutral form loads master weights."""
    if sync not in _SYNCS:
        _SYNCS.append(sync)


def sync_model_params(obj: Any) -> int:
    """Refresh the model's parameters from freshly loaded master weights, through every wrapper
    around the ``MARSM`` in ``obj``; returns how many syncs ran (0: the optimizer steps the model's
    own parameters, FSDP2 and DDP)."""
    ran = 0
    for wrapper in _chain(obj)[:-1]:
        for sync in _SYNCS:
            action = sync(wrapper)
            if action is not None:
                action()
                ran += 1
    return ran


# Wrapper -> (optimizer parameter, model parameter) pairs where the optimizer steps copies (fp32
# mains of bf16 parameters), so a copy is named as its model parameter; or None.
_ALIASES: list[Callable[[Any], Iterable[tuple[Tensor, Tensor]] | None]] = []


def register_param_aliases(aliases: Callable[[Any], Iterable[tuple[Tensor, Tensor]] | None]) -> None:
    """Register ``aliases(wrapper)``: (the optimizer's copy, the model parameter it stands for)
    pairs for a wrapper whose optimizer steps fp32 copies, or None for another wrapper."""
    if aliases not in _ALIASES:
        _ALIASES.append(aliases)


def names_through_wrappers(obj: Any, names: Mapping[int, str] | None) -> Mapping[int, str] | None:
    """``names`` (parameter id -> name) with each wrapper's copies named as their parameters."""
    if names is None:
        return None
    out = dict(names)
    for wrapper in _chain(obj)[:-1]:
        for aliases in _ALIASES:
            for copy, param in aliases(wrapper) or ():
                if id(param) in names:
                    out[id(copy)] = names[id(param)]
    return out


def find_marsm(obj: Any) -> MARSM:
    """The ``MARSM`` inside ``obj``: itself, or the optimizer a wrapper holds (a DeepSpeed engine
    or ZeRO wrapper, Accelerate's or Lightning's optimizer wrappers)."""
    last = _chain(obj)[-1]
    if isinstance(last, MARSM):
        return last
    raise TypeError(f"{type(obj).__name__} is not a MARSM optimizer and wraps none (looked through "
                    f".optimizer); the neutral checkpoint form holds MARS-M's state")


def strip_wrappers(name: str) -> str:
    """``name`` without wrapper levels (leading ``module.`` of DDP, ``_orig_mod.`` of torch.compile,
    ``_checkpoint_wrapped_module.``); a model's own submodule called ``module`` deeper in is kept."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_LEVELS]
    while len(parts) > 1 and parts[0] == _LEADING_WRAPPER:
        parts.pop(0)
    return ".".join(parts)


def names_from_model(model: torch.nn.Module | Iterable[tuple[str, Tensor]]) -> dict[int, str]:
    """Parameter id -> its name in ``model`` (wrapper prefixes removed), for optimizers built
    from bare parameters."""
    pairs = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    return {id(p): strip_wrappers(n) for n, p in pairs}


def _base_name(group: dict[str, Any], i: int, p: Tensor, slot: Slot, slots: int,
               names: Mapping[int, str] | None) -> str | None:
    if slot.name is not None:
        return strip_wrappers(slot.name)
    if slots > 1:
        return None  # a flat buffer's slot needs its own name
    if names is not None and id(p) in names:
        return names[id(p)]
    group_names = group.get("param_names")
    return strip_wrappers(group_names[i]) if group_names is not None else None


def _rank_pieces(p: Tensor, slot: Slot):
    if slot.layout is None:
        return None
    group = adapter_for(p).process_group(p)
    return slot.layout.pieces[dist.get_rank(group) if group is not None else 0]


def held_tensors(optimizer: MARSM, names: Mapping[int, str] | None = None,
                 name_map: NameMap | None = None) -> list[HeldTensor]:
    """Every named parameter of ``optimizer`` with this rank's boxes of it (possibly none).

    Names come from the adapter (ZeRO knows the module's names), then ``names`` (id -> name),
    then the group's ``param_names``; ``name_map`` renames (None: leave the parameter out).
    Raises ValueError naming a parameter with no name, and NotImplementedError for experts.
    """
    held = []
    for gi, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            slots = adapter_for(p).checkpoint_slots(p)
            for k, slot in enumerate(slots):
                name = _base_name(group, i, p, slot, len(slots), names)
                if name is None:
                    raise ValueError(
                        f"param_groups[{gi}]['params'][{i}]" + (f" slot {k}" if len(slots) > 1 else "")
                        + " has no name: build MARSM from param_groups(model, named=True) or named "
                        "parameters, or pass model= so names come from model.named_parameters()")
                if name_map is not None:
                    name = name_map(name)
                    if name is None:
                        continue
                if slot.expert is not None:
                    raise NotImplementedError(
                        f"{name}: one local expert's shard (Megatron's distributed optimizer) has no "
                        f"neutral checkpoint form yet; use the framework's own checkpoint at the same "
                        f"expert-parallel size, or leave the experts out (a name_map returning None)")
                branch = "marsm" if routes_to_marsm(group, slot) else "adamw"
                boxes = piece_boxes(slot.layout, slot.shape, _rank_pieces(p, slot))
                held.append(HeldTensor(name, tuple(slot.shape), branch, gi, p, slot, boxes))
    return held
