"""Whether every rank steps with the same values: an agreement check that rides on the step's
one all-reduce.

Each value a step uses (a group's hyperparameters) becomes a 64-bit code (a number's float64 bits,
else a hash of its repr), cut into four 16-bit digits; each rank adds every digit and its square
to the all-reduced vector. The sums equal W x digit and W x digit^2 exactly when every rank holds
the same digit, so one reduction finds any difference, and names the value. Values held in device
tensors are coded on the device and read with the step's one device-to-host read.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..lr_scale import callable_name

__all__ = ["GroupValues", "disagreement", "host_tensor"]

_DIGITS = 4  # 16-bit digits of a 64-bit code


def on_device(value: Any) -> bool:
    """True for a tensor whose value would take a device-to-host read to know (not on the CPU)."""
    return isinstance(value, Tensor) and value.device.type != "cpu"


def _code(value: Any) -> int:
    """A value's 64-bit code: a number's float64 bits (exact), else a hash of its repr."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)  # (a CPU tensor: no device read)
    elif callable(value):  # (an lr_scale rule): by name, as its repr holds an address
        value = callable_name(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return struct.unpack("<q", struct.pack("<d", float(value)))[0]
        except OverflowError:
            pass
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "little", signed=True)


def _terms(code: int) -> list[float]:
    out: list[float] = []
    for k in range(_DIGITS):
        d = float((code >> (16 * k)) & 0xFFFF)
        out += [d, d * d]
    return out


def _device_terms(value: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The terms of a device tensor's value, computed there, and the value (float64, shape (1,))."""
    v = value.detach().reshape(()).to(device=device, dtype=torch.float64)
    bits = v.view(torch.int64)
    digits = torch.stack([(bits >> (16 * k)) & 0xFFFF for k in range(_DIGITS)]).to(torch.float64)
    return torch.stack([digits, digits * digits], dim=1).reshape(-1), v.reshape(1)


def value_device(value: Any) -> str:
    """Where a value (or the first tensor of a pair) lives, for messages."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return next((str(v.device) for v in items if isinstance(v, Tensor)), "the host")


def _atoms(group: Mapping[str, Any], keys: Sequence[str], arity: Mapping[str, int]) -> list[tuple[str, Any]]:
    """(key, value) of every number of ``keys`` (a pair or triple counts as 2 or 3): the same
    count on every rank, whatever the values (a malformed tuple is one repr and padding)."""
    out: list[tuple[str, Any]] = []
    for key in keys:
        value, n = group.get(key), arity.get(key, 1)
        if n == 1:
            out.append((key, value))
        elif isinstance(value, (tuple, list)) and len(value) == n:
            out += [(key, v) for v in value]
        else:
            out += [(key, repr(value))] + [(key, None)] * (n - 1)
    return out


def host_tensor(values: list[float], device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Host numbers as one vector on ``device`` (float64 unless ``dtype``), without waiting for the
    device (a CUDA copy from pinned memory does not; a plain one waits for the device's queue)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class GroupValues:
    """The groups' values a step uses: the terms for the all-reduce (``agree``), the device
    tensors' values to read with the step's one read (``values_to_read``), and, after it, every
    group's numbers.

    Args:
        param_groups: the groups.
        device: where the statistics are reduced.
        agree: build the agreement terms (under a job group).
        keys: the keys every rank must hold the same values of.
        arity: how many numbers a key holds, where more than one (a pair, a triple).
        numeric: the keys the update reads as numbers (a tensor value is read with the step's read).
    """

    param_groups: Sequence[dict[str, Any]]
    device: torch.device
    agree: bool
    keys: Sequence[str]
    arity: Mapping[str, int]
    numeric: Sequence[str]
    host: list[float] = field(default_factory=list)
    device_terms: list[tuple[int, Tensor]] = field(default_factory=list)
    tensors: list[tuple[int, str, int, Tensor]] = field(default_factory=list)  # (group, key, index, value)
    read: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for gi, group in enumerate(self.param_groups):
            seen: dict[str, int] = {}
            for key, value in self.atoms(group):
                j = seen[key] = seen.get(key, -1) + 1
                if on_device(value) and value.numel() == 1:
                    terms, v = _device_terms(value, self.device)
                    self.tensors.append((gi, key, j, v))
                    if self.agree:
                        self.device_terms.append((len(self.host), terms))
                        self.host += [0.0] * (2 * _DIGITS)
                elif self.agree:
                    self.host += _terms(_code(value))

    def atoms(self, group: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """(key, value) of every number of ``group`` that is agreed on."""
        return _atoms(group, self.keys, self.arity)

    def terms(self) -> Tensor:
        """The agreement terms on the device (empty when not agreeing)."""
        out = host_tensor(self.host, self.device)
        for at, t in self.device_terms:
            out[at:at + t.numel()].copy_(t)
        return out

    def values_to_read(self) -> Tensor:
        """The device tensors' values, to read with everything else."""
        if not self.tensors:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.cat([v for *_, v in self.tensors])

    def set_read(self, read: list[float]) -> None:
        """The values of :meth:`values_to_read`, as read on the host."""
        self.read = read

    def mine(self) -> list[float]:
        """This rank's own agreement terms, as the host knows them after the read."""
        out = list(self.host)
        for (at, _), v in zip(self.device_terms, self.read, strict=True):
            out[at:at + 2 * _DIGITS] = _terms(_code(v))
        return out

    def numbers(self) -> list[dict[str, Any]]:
        """Per group, the ``numeric`` values as floats (a pair as a tuple of floats), device
        tensors replaced by their values read this step."""
        # On meta (a dry run) nothing has a value: a valid stand-in for every key.
        got = [0.5] * len(self.tensors) if self.device.type == "meta" else self.read
        read = {(gi, key, j): v for (gi, key, j, _), v in zip(self.tensors, got, strict=True)}
        out = []
        for gi, group in enumerate(self.param_groups):
            values: dict[str, Any] = {}
            for key in self.numeric:
                n, value = self.arity.get(key, 1), group[key]
                parts = [read.get((gi, key, j), value if n == 1 else value[j]) for j in range(n)]
                values[key] = float(parts[0]) if n == 1 else tuple(float(v) for v in parts)
            out.append(values)
        return out

    def shown(self, gi: int, key: str) -> str:
        """Group ``gi``'s ``key`` as this rank holds it, exactly (a device tensor by the value read:
        a tensor's repr rounds)."""
        read = [v for (g, k, _, _), v in zip(self.tensors, self.read, strict=True) if (g, k) == (gi, key)]
        value = self.param_groups[gi].get(key)
        if read:
            return f"{read[0] if len(read) == 1 else tuple(read)!r} in a tensor on {value_device(value)}"
        if isinstance(value, Tensor) and value.numel() == 1:
            return f"{float(value)!r} in a tensor"
        return repr(value)


def disagreement(values: GroupValues, summed: list[float], world_size: int) -> str | None:
    """Which value differs between ranks (from this rank's terms and their sums), or None."""
    mine, groups = values.mine(), values.param_groups
    keys = [(i, key) for i, group in enumerate(groups) for key, _ in values.atoms(group)]
    width = 2 * _DIGITS
    for n, (i, key) in enumerate(keys):
        for k in range(n * width, (n + 1) * width, 2):
            d, total, squares = mine[k], summed[k], summed[k + 1]
            if total != world_size * d or squares != world_size * d * d:
                return (f"param group {i}'s {key!r} differs between ranks (this rank has "
                        f"{values.shown(i, key)}); every rank must step with the same values")
    return None
