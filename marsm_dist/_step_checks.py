"""What a step checks before it writes anything, beyond the gradients: the param groups' values
(valid on this rank, and the same on every rank) and this rank's own refusals.

Schedulers and users write group values between steps (``lr`` = NaN, ``momentum`` = 1), and a
rank that computes a different value (a per-rank config) would train a diverged replica, or
abort inside the exchange. Both are folded into the step's one all-reduce: a flag for invalid
values, and per value its 64-bit code (a number's float64 bits; other values, a hash of their
repr) in four 16-bit digits ``d``, each sent as ``d`` and ``d**2``. Summed over W ranks they equal
``W d`` and ``W d**2`` only if every rank has the same ``d`` (the sum of ``(d_r - d)**2`` is then
zero), and the sums stay far below 2**53, so float64 adds them exactly: values are compared
exactly, whatever their type or device. Every rank sees the same verdict and raises before
anything is written, with no extra collective.

A hyperparameter held in a tensor on a device (a tensor ``lr``) is never read on its own: its
digits are computed on the device, and its value rides the step's one device-to-host read (see
:class:`HyperValues`), after which it is checked and used as a number like any other.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._step_inputs import GroupWork, check_lookahead_ready
from ._validation import on_device, restore_group_types, validate_hyperparameters

__all__ = ["AGREED_KEYS", "UNTOUCHED", "HyperValues", "disagreement", "host_tensor", "invalid_value",
           "local_problem", "on_device", "stale_shards", "warn_no_gradients"]

UNTOUCHED = "parameters and optimizer state were left untouched"

# The values a step uses, per group, and how many numbers each holds.
AGREED_KEYS = ("lr", "weight_decay", "momentum", "gamma", "ns_steps", "ns_dtype", "adamw_betas", "adamw_eps",
               "approx", "ns_coefficients", "flatten", "maximize", "ns_form", "use_marsm", "experts")
_ARITY = {"adamw_betas": 2, "ns_coefficients": 3}
# The numbers the update math reads, per group (after the step's read, as Python floats).
NUMERIC_KEYS = ("lr", "weight_decay", "momentum", "gamma", "adamw_eps")
_DIGITS = 4  # 16-bit digits of a 64-bit code


def invalid_value(param_groups: Sequence[dict[str, Any]]) -> str | None:
    """The first invalid value of any group, in torch.optim's voice (None: all valid). Values in
    device tensors are checked for shape only here; their values after the step's read."""
    for i, group in enumerate(param_groups):
        restore_group_types(group)
        try:
            validate_hyperparameters(group, f" in param group {i}", read_tensors=False)
        except ValueError as err:
            return str(err)
    return None


def _code(value: Any) -> int:
    """A value's 64-bit code: a number's float64 bits (exact), else a hash of its repr."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)  # (a CPU tensor: no device read)
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


def _atoms(group: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) of every number the step uses (a pair or triple counts as 2 or 3): the same
    count on every rank, whatever the values (a malformed tuple is one repr and padding)."""
    out: list[tuple[str, Any]] = []
    for key in AGREED_KEYS:
        value, n = group.get(key), _ARITY.get(key, 1)
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
class HyperValues:
    """The step's hyperparameters: the terms for the all-reduce (``agree``), the device tensors'
    values to read with the step's one read (``to_read``), and, after it, every group's numbers.

    Args:
        param_groups: the groups.
        device: where the statistics are reduced.
        agree: build the agreement terms (under a job group).
    """

    param_groups: Sequence[dict[str, Any]]
    device: torch.device
    agree: bool
    host: list[float] = field(default_factory=list)
    device_terms: list[tuple[int, Tensor]] = field(default_factory=list)
    tensors: list[tuple[int, str, int, Tensor]] = field(default_factory=list)  # (group, key, index, value)
    read: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for gi, group in enumerate(self.param_groups):
            seen: dict[str, int] = {}
            for key, value in _atoms(group):
                j = seen[key] = seen.get(key, -1) + 1
                if on_device(value) and value.numel() == 1:
                    terms, v = _device_terms(value, self.device)
                    self.tensors.append((gi, key, j, v))
                    if self.agree:
                        self.device_terms.append((len(self.host), terms))
                        self.host += [0.0] * (2 * _DIGITS)
                elif self.agree:
                    self.host += _terms(_code(value))

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
        """Per group, the numbers the update reads (``NUMERIC_KEYS`` and ``adamw_betas``), device
        tensors replaced by their values read this step."""
        # On meta (a dry run) nothing has a value: a valid stand-in for every key.
        got = [0.5] * len(self.tensors) if self.device.type == "meta" else self.read
        read = {(gi, key, j): v for (gi, key, j, _), v in zip(self.tensors, got, strict=True)}
        out = []
        for gi, group in enumerate(self.param_groups):
            values = {key: read.get((gi, key, 0), group[key]) for key in NUMERIC_KEYS}
            values = {k: float(v) for k, v in values.items()}
            betas = group["adamw_betas"]
            values["adamw_betas"] = tuple(float(read.get((gi, "adamw_betas", j), betas[j])) for j in range(2))
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

    def invalid_read(self) -> str | None:
        """The first device-held value that is invalid, now that it has been read (None: all valid)."""
        if not self.tensors:
            return None
        for gi, values in enumerate(self.numbers()):
            group = {**self.param_groups[gi], **values}
            try:
                validate_hyperparameters(group, f" in param group {gi}")
            except ValueError as err:
                return str(err)
        return None


def disagreement(hyper: HyperValues, summed: list[float], world_size: int) -> str | None:
    """Which value differs between ranks (from this rank's terms and their sums), or None."""
    mine, groups = hyper.mine(), hyper.param_groups
    keys = [(i, key) for i, group in enumerate(groups) for key, _ in _atoms(group)]
    width = 2 * _DIGITS
    for n, (i, key) in enumerate(keys):
        for k in range(n * width, (n + 1) * width, 2):
            d, total, squares = mine[k], summed[k], summed[k + 1]
            if total != world_size * d or squares != world_size * d * d:
                return (f"param group {i}'s {key!r} differs between ranks (this rank has "
                        f"{hyper.shown(i, key)}); every rank must step with the same values")
    return None


def local_problem(param_groups: list[dict[str, Any]], matrix: list[GroupWork], state: Mapping
                  ) -> Exception | None:
    """What this rank refuses before anything is written: an invalid group value, or a missing
    look-ahead (exact mode). Returned, not raised: under a job group every rank must learn of it
    through the step's all-reduce and refuse too, or the others would wait in its collectives."""
    invalid = invalid_value(param_groups)
    if invalid is not None:
        return ValueError(f"MARSM: {invalid}; {UNTOUCHED}")
    try:
        check_lookahead_ready(param_groups, matrix, state)
    except RuntimeError as err:
        return RuntimeError(f"{err}; {UNTOUCHED}")
    return None


def stale_shards(pm: Any, matrix: list[GroupWork]) -> Exception | None:
    """A sharded matrix whose local part no longer has the size its plan was made for (a parameter
    resized in place after the optimizer planned): refused here, before anything is written,
    rather than by the exchange halfway through the step."""
    distributor = pm.distributor
    for work in matrix:
        for p, (_, k), local, slot in zip(work.params, work.indices, work.local_params, work.slots,
                                          strict=True):
            layout = distributor.matrices[pm.matrix_index[(id(p), k)]].layout
            planned = layout.local_numel(distributor.rank) if layout is not None else local.numel()
            if local.numel() != planned:
                name = "" if slot.name is None else f" {slot.name!r}"
                return RuntimeError(
                    f"MARSM: this rank's part of a {layout.shape} matrix{name} has {local.numel()} "
                    f"elements; the optimizer planned for {planned} (was the parameter replaced or resized "
                    f"after the optimizer was built?); {UNTOUCHED}")
    return None


def warn_no_gradients() -> None:
    """The warning for an optimizer none of whose parameters got a gradient (given once)."""
    warnings.warn(
        "MARSM.step(): none of the optimizer's parameters has a gradient. If the model was "
        "wrapped or sharded after the optimizer was built (fully_shard, DDP, accelerate's "
        "prepare replace the parameters), the optimizer holds the old tensors: build it from "
        "the wrapped model's parameters.", stacklevel=4)
