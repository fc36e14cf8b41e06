"""Offloaded shards, exchanged on a device: optimizer state on the host, collectives and
Newton-Schulz on the device the job group serves.

With DeepSpeed's ``offload_optimizer`` or FSDP2's ``CPUOffloadPolicy`` the shards (and so MARS-M's
state and its elementwise work) live on the CPU, while an NCCL group serves CUDA tensors only.
Then each round's momentum pieces go to the group's device (:meth:`Staging.to_device`: packed
into one host buffer, pinned where CUDA is, and copied with one ``non_blocking`` copy), the
exchange and Newton-Schulz run there, and this rank's results come back the same way
(:meth:`Staging.to_host`: ``non_blocking`` copies into one host buffer, waited for by an event
only when the results are applied). The engine holds at most two rounds' buffers (the next
round's gather and the previous round's results), so the staged device memory stays about two
buckets; its copies run while the host applies the previous round.

:func:`group_device` decides where a group's collectives take their tensors; nothing is kept.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Landing", "Staging", "default_pin_memory", "group_device"]


def group_device(group: dist.ProcessGroup, device: torch.device) -> torch.device | None:
    """The device ``group``'s collectives take tensors on, for shards on ``device``: ``device``
    itself when the group serves it (or does not say); for shards on the CPU under a group that
    serves only devices (NCCL: CUDA), the current CUDA device, or ``meta`` for a group that serves
    ``meta`` (the tests' stand-in for a GPU); None when the group serves neither."""
    served = getattr(group, "_device_types", None)  # private in torch 2.6-2.14: trust it if absent
    if served is None:
        return device
    types = {d.type for d in served}
    if device.type in types:
        return device
    if device.type == "cpu":
        if "cuda" in types and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if "meta" in types:
            return torch.device("meta")
    return None


def default_pin_memory(device: torch.device) -> bool:
    """Pin the host buffers where copies to ``device`` can use pinned memory: a CUDA device, in a
    process that has CUDA (pinning needs a CUDA runtime; on a CPU-only host it fails)."""
    return device.type == "cuda" and torch.cuda.is_available()


class Landing:
    """Device-to-host copies of one round's results on their way: :meth:`wait` gives the host
    tensors (``None`` where the round gave none) once the copies have landed."""

    def __init__(self, host: list[Tensor | None], event: torch.Event | None, keep: list[Tensor | None]
                 ) -> None:
        self._host, self._event, self._keep = host, event, keep

    def wait(self) -> list[Tensor | None]:
        if self._event is not None:
            self._event.synchronize()  # this round's copies only (queued before the next round's NS)
            self._event = None
        self._keep = []  # the device sources may go now
        return self._host


class Staging:
    """Moves one round's pieces between the shards' host and the exchange device.

    Args:
        device: where the exchange and Newton-Schulz run (the job group's device).
        pin_memory: stage through pinned host buffers (``non_blocking`` copies that overlap the
            host's work). None: where CUDA is (:func:`default_pin_memory`). ``False`` is the
            choice on a CPU-only host, where pinning fails.
        host: where the shards live (the CPU).

    Counters (for diagnostics and the tests): ``bytes_to_device`` and ``bytes_to_host`` staged
    so far; ``live`` and ``peak``: bytes of staged device buffers alive now and at most.
    """

    def __init__(self, device: torch.device, pin_memory: bool | None = None,
                 host: torch.device | None = None) -> None:
        self.device, self.host = device, host or torch.device("cpu")
        self.pin = default_pin_memory(device) if pin_memory is None else bool(pin_memory)
        if self.pin and not torch.cuda.is_available():
            raise ValueError("MARSM: pin_memory=True needs a CUDA runtime, which this process does not "
                             "have; pass pin_memory=False on a CPU-only host")
        self.bytes_to_device = self.bytes_to_host = 0
        self.live = self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def to_device(self, pieces: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
        """``pieces`` (host tensors) on the device in ``dtype``, flat: views of one buffer, sent by
        one copy that does not wait for the device (from pinned memory)."""
        sizes = [p.numel() for p in pieces]
        buf = torch.empty(sum(sizes), dtype=dtype, device=self.host, pin_memory=self.pin)
        offset = 0
        for p, n in zip(pieces, sizes, strict=True):
            buf[offset:offset + n].copy_(p.reshape(-1))
            offset += n
        staged = buf.to(self.device, non_blocking=self.pin)
        del buf  # (pinned: the host allocator keeps it until the copy is done)
        self.bytes_to_device += staged.numel() * staged.element_size()
        self._track(staged)
        return list(staged.split(sizes))

    def to_host(self, pieces: list[Tensor | None]) -> Landing:
        """Start copying ``pieces`` (device tensors, or None) into one host buffer; the returned
        :class:`Landing` gives them flat on the host. On ``meta`` (a dry run) nothing has a value:
        ones stand in, as :class:`marsm_dist.diagnostics.HostReads` answers a read."""
        present = [p.reshape(-1) for p in pieces if p is not None]
        sizes = [p.numel() for p in present]
        dtype = present[0].dtype if present else torch.float32
        if self.device.type == "meta":
            buf = torch.ones(sum(sizes), dtype=dtype, device=self.host)
        else:
            buf = torch.empty(sum(sizes), dtype=dtype, device=self.host, pin_memory=self.pin)
            offset = 0
            for p, n in zip(present, sizes, strict=True):
                buf[offset:offset + n].copy_(p, non_blocking=self.pin)
                offset += n
        event = None
        if self.pin and self.device.type not in ("cpu", "meta"):
            event = torch.Event(device=self.device)
            event.record()
        self.bytes_to_host += buf.numel() * buf.element_size()
        views = iter(buf.split(sizes))
        return Landing([next(views) if p is not None else None for p in pieces], event, list(pieces))

    def _track(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self._tracked:
            return
        self.live += size
        self.peak = max(self.peak, self.live)
        self._tracked[key] = weakref.ref(storage, self._freer(key, size))

    def _freer(self, key: int, size: int) -> Callable[[object], None]:
        def free(_: object) -> None:
            self.live -= size
            self._tracked.pop(key, None)
        return free
