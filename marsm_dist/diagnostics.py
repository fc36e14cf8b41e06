"""Measure what an optimizer step costs beyond its arithmetic: host reads and extra memory.

Both tools work on any device, including the ``meta`` device, which stands in for a GPU on a
machine without one: meta tensors take the non-CPU code paths and hit the same cross-device
checks, but hold no data and no memory.

- :class:`HostReads` counts device-to-host reads (``.item()``, ``.tolist()``, ``bool(t)``,
  ``float(t)``, ``.cpu()``, ...) of non-CPU tensors. Each one is a synchronization on a GPU.
  On the meta device there is no value to read, so the counter *answers* each read with a
  tensor of ones of the right shape (a finite, unclipped, active statistic).
- :class:`PeakMemory` tracks the bytes of the tensor storages created while it is active and
  reports the peak of those still alive: the extra memory on top of what existed before
  (parameters, gradients, optimizer state). It counts storages, so views and in-place results
  cost nothing, and works on meta tensors (their storages have a size but no memory).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostReads", "PeakMemory"]

# Tensor methods that copy a device value to the host.
_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
    torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
}


def _to_cpu_call(func: Callable, args: tuple, kwargs: dict) -> bool:
    """``t.to("cpu")``-style calls (a host copy when ``t`` is on a device)."""
    if func is not torch.Tensor.to:
        return False
    target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return target is not None and torch.device(target).type == "cpu"


class HostReads(TorchFunctionMode):
    """Count device-to-host reads inside the ``with`` block; answer them on the meta device.

    Attributes:
        count: the reads seen so far.
        where: a short description of each read (method and tensor shape), in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is None or t.device.type == "cpu" or not (func in _READS or _to_cpu_call(func, args, kwargs)):
            return func(*args, **kwargs)
        self.count += 1
        self.where.append(f"{getattr(func, '__name__', func)} of {tuple(t.shape)} on {t.device}")
        if t.device.type != "meta":
            return func(*args, **kwargs)
        answer = torch.ones(t.shape, dtype=t.dtype)  # the meta device has no value to give
        if func is torch.Tensor.cpu or func is torch.Tensor.to:
            return answer
        if func is torch.Tensor.numpy:
            return answer.numpy()
        return func(answer, *args[1:], **kwargs)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the ``with`` block and still alive.

    A storage counts from the op that creates it until it is freed. An op's output that shares
    a storage with one of its inputs (a view, an in-place op) creates nothing.

    Args:
        device: count only storages on this device type (e.g. ``"cuda"`` or ``"meta"`` for an
            offloaded step, whose state is on the CPU); None: every device.

    Attributes:
        live: bytes of tracked storages alive now.
        peak: the largest ``live`` seen.
    """

    def __init__(self, device: str | None = None) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(s) for s in _storages(tree_flatten((args, kwargs))[0])}
        for storage in _storages(tree_flatten(out)[0]):
            key = id(storage)
            if key in inputs or key in self._tracked or self.device not in (None, storage.device.type):
                continue
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            self._tracked[key] = weakref.ref(storage, self._freer(key, size))
        return out

    def _freer(self, key: int, size: int) -> Callable[[Any], None]:
        def free(_: Any) -> None:
            self.live -= size
            self._tracked.pop(key, None)
        return free


def _storages(values: list[Any]) -> list[torch.UntypedStorage]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) and not _is_wrapper(v):
            out.append(v.untyped_storage())
    return out


def _is_wrapper(t: torch.Tensor) -> bool:
    # Tensor subclasses (DTensor) hold their data in an inner tensor, which the dispatch of the
    # inner op reports itself.
    return type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter
