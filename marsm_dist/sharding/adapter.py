"""How the optimizer learns what a parameter's local shard is, without knowing any framework.

An adapter answers, for the parameters it recognizes: the local tensor behind a parameter, grad
or state tensor; the process group its shards are spread over; the piece layout of a matrix;
and how to create a state tensor that the framework's checkpointing saves correctly. A plain
tensor, which no adapter claims, is a world of one.

Registration is explicit, and importing ``marsm_dist`` registers nothing. The adapters come in
two ways:

* Loaded by this registry at a lookup (:func:`adapter_for`), once the package that makes their
  tensors is imported (no such tensor can exist before): the FSDP2/DTensor adapter (torch only,
  so at the first lookup) and Megatron's tensor-parallel adapter (once ``megatron.core`` is
  imported; its builder also registers it). This module names their modules rather than importing
  them: it sits below the adapters, and a plain ``MARSM`` should not pay for them before it is used.
* Registered by the framework entry point that fills their side table: DeepSpeed's
  ``install()`` (``import marsm_dist.adapters.deepspeed`` runs it) and Megatron's
  ``ShardedMARSMOptimizer`` (its main shards).

Which adapter answers does not depend on import order: the highest ``priority`` is asked first,
ties by adapter name. The built-in ones, and why in this order:

====  ====================  ==============================================================
40    megatron-dp-shard     only the main shards it registered; they carry their parameter's
                            tensor-parallel attributes, which the TP adapter (20) would claim
30    deepspeed             ZeRO partitions it registered and ZeRO-3 placeholders (``ds_shape``):
                            a placeholder of a Megatron-style TP layer (Megatron-DeepSpeed) also
                            carries ``tensor_model_parallel``, but its shape is DeepSpeed's
20    megatron              tensors with Megatron's marks (``tensor_model_parallel``, expert
                            ``allreduce=False`` without DeepSpeed's ``group_name``)
10    fsdp2                 any DTensor: torch's own type, asked after every framework's marks
====  ====================  ==============================================================

Exact side tables come first, then marks on the tensor, the most specific first. A third-party
adapter picks its place with ``register_adapter(adapter, priority=...)``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from .layout import MatrixLayout, whole
from .offload import group_device
from .subgroups import GroupRequest

__all__ = ["ShardingAdapter", "SideTableAdapter", "Slot", "adapter_for", "check_group_serves",
           "register_adapter", "registered_adapters", "slot_view"]


@dataclass(frozen=True)
class Slot:
    """One logical tensor held (in part) by a parameter *container*.

    Usually a container is one parameter and has one slot. Frameworks that hand the optimizer
    flat buffers (ZeRO partitions) have one slot per original parameter that the buffer covers
    on any rank; every rank lists the same slots, some with no local elements.

    Attributes:
        shape: the logical full shape (routing, update scale and Newton-Schulz use it).
        layout: the pieces every rank holds, or None when this process holds the whole tensor.
        offset, numel: where this rank's elements sit in the container's flattened local tensor;
            ``numel=-1`` means the whole local tensor, kept in its own shape.
        name: a readable name for messages, when the adapter knows one.
        expert: for one expert of a tensor whose dim 0 indexes experts (a param group with
            ``experts=True``), its index; ``shape`` is then that expert's own shape.
    """

    shape: tuple[int, ...]
    layout: MatrixLayout | None = None
    offset: int = 0
    numel: int = -1
    name: str | None = None
    expert: int | None = None


def slot_view(local: Tensor, slot: Slot) -> Tensor:
    """This rank's elements of ``slot`` inside the container's local tensor (a view)."""
    if slot.numel < 0:
        return local
    return local.view(-1)[slot.offset:slot.offset + slot.numel]


class ShardingAdapter:
    """The base adapter: a plain, unsharded tensor (every rank holds all of it, or one process).

    Subclasses override :meth:`handles` and whatever differs for their framework.
    """

    name = "plain"
    #: Create state for every parameter when the optimizer is built (rank-symmetric checkpoint
    #: keys). False where the framework swaps parameters after construction (ZeRO).
    prepopulate_state = False

    def handles(self, p: Tensor) -> bool:
        return True

    def local(self, t: Tensor) -> Tensor:
        """The local tensor behind a parameter, gradient or state tensor (in-place writes stick)."""
        return t

    def zeros_state(self, p: Tensor) -> Tensor:
        """A zero state tensor for ``p``, in the form the framework's checkpointing expects."""
        return torch.zeros_like(p, memory_format=torch.preserve_format)

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The group ``p``'s shards are spread over, or None when this process holds all of it."""
        return None

    def replica_group(self, p: Tensor) -> dist.ProcessGroup | GroupRequest | None:
        """For a layout with replicas: the group of ranks that hold the same pieces as this rank
        (one per copy), over which results reach the other copies, or a request for groups the
        optimizer makes (on every rank, after its plan check). None: no replicas."""
        return None

    def root_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The widest group ``p``'s layout can be described over (see :meth:`widen`), when it is
        wider than :meth:`process_group`; None: no wider one. The optimizer uses it when the
        parameters' groups cross (experts on one mesh dim, dense weights on another)."""
        return None

    def widen(self, p: Tensor, group: dist.ProcessGroup
              ) -> tuple[MatrixLayout, dist.ProcessGroup | GroupRequest | None] | None:
        """``p``'s layout over ``group``, a wider group than :meth:`process_group` (the ranks
        outside it hold copies), and the replica group; None if this adapter cannot tell."""
        return None

    def layout(self, p: Tensor) -> MatrixLayout:
        """The pieces every rank of :meth:`process_group` holds of ``p``."""
        return whole(tuple(p.shape))

    def slots(self, p: Tensor) -> list[Slot]:
        """The logical tensors container ``p`` holds: by default ``p`` itself, one slot."""
        if self.process_group(p) is None:
            return [Slot(tuple(p.shape))]
        layout = self.layout(p)
        return [Slot(layout.shape, layout)]  # the full logical shape, not the local one

    def checkpoint_slots(self, p: Tensor) -> list[Slot]:
        """The slots a checkpoint keyed by full tensors reads (``marsm_dist.checkpoint``): each with
        its parameter's full shape and layout on either branch. By default :meth:`slots`; an
        adapter whose AdamW-branch slots are bare flat ranges gives the full ones here."""
        return self.slots(p)


class SideTableAdapter(ShardingAdapter):
    """An adapter for tensors that carry no mark of their own: the framework glue registers each one
    with what it knows of it (its slots and group, a split to apply, ...), and the adapter reads that.

    The table is kept beside the tensors, not on them: an attribute would travel into pickles
    (DeepSpeed's ZeRO-3 checkpoint pickles its flat tensors, and a process group cannot be pickled).
    It is weakly keyed by identity: entries go with their tensors (an engine that is gone leaves
    nothing behind), and a tensor's ``==`` is elementwise, not identity.
    """

    def __init__(self) -> None:
        self._table: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def register(self, t: Tensor, info: Any) -> None:
        """Remember ``info`` for ``t`` (replacing what was registered for it before)."""
        self._table[t] = info

    def info(self, t: Tensor) -> Any:
        """What was registered for ``t``, or None."""
        return self._table.get(t)

    def handles(self, p: Tensor) -> bool:
        return p in self._table


_PLAIN = ShardingAdapter()
_ADAPTERS: list[tuple[int, ShardingAdapter]] = []  # (priority, adapter), in the order they are asked
# Loaded at a lookup once the first package is imported: (that package, the marsm_dist module whose
# register() registers the adapter). See the module doc.
_DEFERRED: list[tuple[str, str]] = [("torch", "marsm_dist.adapters.fsdp2"),
                                    ("megatron.core", "marsm_dist.adapters.megatron.tp_adapter")]


def register_adapter(adapter: ShardingAdapter, *, priority: int = 0) -> None:
    """Make ``adapter`` known to every MARSM optimizer, asked before those of lower ``priority``
    (ties: by ``adapter.name``). Idempotent: a second adapter of the same type is ignored."""
    if any(type(a) is type(adapter) for _, a in _ADAPTERS):
        return
    _ADAPTERS.append((priority, adapter))
    _ADAPTERS.sort(key=lambda e: (-e[0], e[1].name, type(e[1]).__qualname__))


def registered_adapters() -> list[tuple[int, ShardingAdapter]]:
    """``(priority, adapter)`` of the adapters registered so far, in the order they are asked
    (those this registry loads itself only appear after a lookup)."""
    return list(_ADAPTERS)


def _load_deferred() -> None:
    for entry in [e for e in _DEFERRED if e[0] in sys.modules]:
        _DEFERRED.remove(entry)
        try:
            importlib.import_module(entry[1]).register()
        except ImportError as err:  # a framework version the adapter cannot use: say so, once
            warnings.warn(f"MARSM: {entry[0]} is imported but {entry[1]} failed to load ({err}); "
                          f"its sharded tensors will be treated as whole tensors.", RuntimeWarning,
                          stacklevel=3)


def adapter_for(p: Tensor) -> ShardingAdapter:
    """The adapter that handles ``p`` (the plain one when none claims it)."""
    if _DEFERRED:  # one dict lookup per pending entry, until its package is imported
        _load_deferred()
    for _, adapter in _ADAPTERS:
        if adapter.handles(p):
            return adapter
    return _PLAIN


def check_group_serves(group: dist.ProcessGroup, device: torch.device, name: str) -> torch.device:
    """The device ``group``'s collectives take tensors on, for shards on ``device``
    (:func:`~marsm_dist.sharding.offload.group_device`); refuse, up front, a group that serves
    neither the shards' device nor, for shards on the CPU, a device to exchange them on.

    The usual case is optimizer offload: DeepSpeed's ``offload_optimizer`` or FSDP2's
    ``CPUOffloadPolicy`` keep the shards (and so MARS-M's state and step) on the CPU while the
    group is NCCL, which serves CUDA tensors only. That is served: the shards are staged to the
    current CUDA device for the exchange and Newton-Schulz (:mod:`marsm_dist.sharding.offload`).
    Refused: such a group in a process without CUDA, or shards on a device the group has no
    backend for (the first collective would fail mid-step).
    """
    served = group_device(group, device)
    if served is not None:
        return served
    backend = dist.get_backend(group)
    types = sorted({d.type for d in getattr(group, "_device_types", ())})
    cuda = ("" if device.type != "cpu" or "cuda" not in types else
            ", and this process has no CUDA device to exchange CPU shards on")
    raise ValueError(
        f"MARSM: {name} is sharded on {device}, but its process group ({backend}) serves only "
        f"{'/'.join(types)} tensors{cuda}. Shards on the CPU (DeepSpeed offload_optimizer, FSDP2 "
        f"CPUOffloadPolicy) need a group that serves CUDA (NCCL, with a GPU in this process: the "
        f"exchange and Newton-Schulz then run on it) or the CPU (e.g. backend='cpu:gloo,cuda:nccl'); "
        f"other shards need a group with a backend for their device.")
