"""The checks of MARSM's options (see :mod:`marsm_dist.options`): each raises ``ValueError`` naming the
option and saying what it accepts; and the dtype names a config file may use."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .lr_scale import check_lr_scale_value
from .ns_coefficients import coefficient_schedule
from .sharding.agreement import on_device

# The checks themselves (in_range, flag, ...) are for options.py only.
__all__ = ["Check", "dtype_name", "number", "resolve_dtype"]

Check = Callable[[Any, str, bool], None]  # (value, where, read device tensors) -> raise ValueError

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def resolve_dtype(value: Any, name: str = "ns_dtype") -> torch.dtype:
    """Accept a floating torch.dtype or its name (``"float32"``, ``"bf16"``, ``"torch.bfloat16"``)."""
    if isinstance(value, str):
        key = value.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of {sorted(_DTYPES)})")
        return _DTYPES[key]
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    raise ValueError(f"Invalid {name}: {value!r} (expected torch.bfloat16, float16, float32 or float64)")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what :func:`resolve_dtype` reads back)."""
    return str(dtype).removeprefix("torch.")


def check_dtype(value: Any, where: str, read: bool) -> None:
    resolve_dtype(value, "ns_dtype" + where)


def _fail(name: str, value: Any, where: str, why: str) -> None:
    raise ValueError(f"Invalid {name}{where}: {value!r} ({why})")


def number(value: Any, read: bool = True) -> float | None:
    """The value as a float; None for a device tensor when ``read`` is False (reading it would
    wait for the device: a step checks it after its one read instead)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError("Tensor hyperparameters must have exactly one element")
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"Tensor hyperparameters must be real numbers, got dtype {value.dtype}")
        if (not read and on_device(value)) or value.device.type == "meta":  # (meta: no value at all)
            return None
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def in_range(name: str, lo: float, hi_open: float | None = None) -> Check:
    def check(value: Any, where: str, read: bool) -> None:
        try:
            x = number(value, read)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Invalid {name}{where}: {value!r} ({err})") from None
        if x is not None and not (math.isfinite(x) and x >= lo and (hi_open is None or x < hi_open)):
            why = f"must be in [{lo}, {hi_open})" if hi_open is not None else f"must be >= {lo}"
            _fail(name, value, where, why)
    return check


def check_betas(value: Any, where: str, read: bool) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        _fail("adamw_betas", value, where, "must be a pair (beta1, beta2)")
    for i, beta in enumerate(value):
        in_range(f"adamw_betas[{i}]", 0.0, 1.0)(beta, where, read)


def check_coefficients(value: Any, where: str, read: bool) -> None:
    try:
        coefficient_schedule(value)
    except ValueError as err:
        _fail("ns_coefficients", value, where, str(err))


def check_lr_scale(value: Any, where: str, read: bool) -> None:
    why = check_lr_scale_value(value)
    if why is not None:
        _fail("lr_scale", value, where, why)


def flag(name: str, none_ok: bool = False) -> Check:
    def check(value: Any, where: str, read: bool) -> None:
        if not (isinstance(value, bool) or (none_ok and value is None)):
            _fail(name, value, where, "must be True, False or None" if none_ok else "must be True or False")
    return check


def int_where(name: str, ok: Callable[[int], bool], why: str) -> Check:
    def check(value: Any, where: str, read: bool) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            _fail(name, value, where, why)
    return check


def one_of(name: str, choices: Iterable[str]) -> Check:
    choices = tuple(choices)

    def check(value: Any, where: str, read: bool) -> None:
        if value not in choices:
            _fail(name, value, where, f"must be one of {', '.join(map(repr, choices))}")
    return check


def anything(value: Any, where: str, read: bool) -> None:
    return None
