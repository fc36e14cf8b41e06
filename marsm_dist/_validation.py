"""Checks on MARSM's hyperparameters, in torch.optim's voice: name the argument, show the value."""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .newton_schulz import NS_FORMS
from .sharding.plan import OWNER_POLICIES

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
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
    raise ValueError(f"Invalid {name}: {value!r} (expected torch.bfloat16, float16, float32 or float64, "
                     f"or its name)")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (what :func:`resolve_dtype` reads back)."""
    return str(dtype).removeprefix("torch.")


def restore_group_types(group: dict[str, Any]) -> None:
    """Give a param group's values their own types back after a round trip through plain
    containers (a state dict, JSON, torch's state-dict helpers): tuples that came back as lists,
    ``ns_dtype`` as a name. Values that cannot be converted are left for validation to refuse."""
    for key in ("adamw_betas", "ns_coefficients"):
        if isinstance(group.get(key), list):
            group[key] = tuple(group[key])
    if isinstance(group.get("ns_dtype"), str) and group["ns_dtype"].lower().removeprefix("torch.") in _DTYPES:
        group["ns_dtype"] = resolve_dtype(group["ns_dtype"])


def on_device(value: Any) -> bool:
    """True for a tensor whose value would take a device-to-host read to know (not on the CPU)."""
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _number(value: Any, read: bool = True) -> float | None:
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


def _check(ok: bool, name: str, value: Any, where: str, why: str) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}{where}: {value!r} ({why})")


def check_ns_form(form: Any, where: str = "") -> None:
    """``ns_form`` must name one of the Newton-Schulz forms."""
    _check(form in NS_FORMS, "ns_form", form, where, f"must be one of {', '.join(NS_FORMS)}")


def _check_number(group: Mapping[str, Any], name: str, where: str, lo: float, hi_open: float | None,
                  read: bool = True):
    value = group[name]
    try:
        x = _number(value, read)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid {name}{where}: {value!r} ({err})") from None
    if x is None:
        return
    rng = f"must be in [{lo}, {hi_open})" if hi_open is not None else f"must be >= {lo}"
    _check(math.isfinite(x) and x >= lo and (hi_open is None or x < hi_open), name, value, where, rng)


def validate_hyperparameters(group: Mapping[str, Any], where: str = "", *, read_tensors: bool = True) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group`` (or the defaults).
    ``read_tensors=False``: values held in device tensors are checked for shape only (a step
    checks their values after its one device-to-host read)."""
    r = read_tensors
    _check_number(group, "lr", where, 0.0, None, r)
    _check_number(group, "weight_decay", where, 0.0, None, r)
    _check_number(group, "momentum", where, 0.0, 1.0, r)
    _check_number(group, "gamma", where, 0.0, None, r)
    _check_number(group, "adamw_eps", where, 0.0, None, r)
    steps = group["ns_steps"]
    _check(
        isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 100,
        "ns_steps", steps, where, "must be an int in [1, 100]",
    )
    betas = group["adamw_betas"]
    _check(
        isinstance(betas, (tuple, list)) and len(betas) == 2,
        "adamw_betas", betas, where, "must be a pair (beta1, beta2)",
    )
    for i, beta in enumerate(betas):
        _check_number({f"adamw_betas[{i}]": beta}, f"adamw_betas[{i}]", where, 0.0, 1.0, r)
    coeffs = group["ns_coefficients"]
    _check(
        isinstance(coeffs, (tuple, list)) and len(coeffs) == 3
        and all(isinstance(c, (int, float)) and math.isfinite(c) for c in coeffs),
        "ns_coefficients", coeffs, where, "must be three finite numbers (a, b, c)",
    )
    for flag in ("approx", "flatten", "maximize"):
        _check(isinstance(group[flag], bool), flag, group[flag], where, "must be True or False")
    experts = group.get("experts", False)
    _check(isinstance(experts, bool), "experts", experts, where, "must be True or False")
    check_ns_form(group.get("ns_form", "auto"), where)
    use = group["use_marsm"]
    _check(use is None or isinstance(use, bool), "use_marsm", use, where, "must be True, False or None")
    resolve_dtype(group["ns_dtype"], "ns_dtype" + where)


def check_param(p: torch.Tensor, group: Mapping[str, Any], name: str,
                shapes: list[tuple[int, ...]]) -> None:
    """Refuse a parameter MARS-M cannot take in ``group``, naming it. ``shapes`` are the logical
    shapes it holds (its own shape, or the real shapes behind a framework's flat buffer)."""
    if torch.is_complex(p):
        raise ValueError(f"MARSM does not support complex parameters ({name})")
    if not p.is_floating_point():
        raise ValueError(f"MARSM optimizes floating-point tensors only; {name} has dtype {p.dtype}")
    small = [s for s in shapes if len(s) < 2]
    if group["use_marsm"] is True and small:
        raise ValueError(
            f"use_marsm=True needs tensors with at least 2 dims, but {name} has shape "
            f"{small[0]}; put it in a use_marsm=False group"
        )


def check_no_duplicates(params: list[torch.Tensor], name_of) -> None:
    """The same tensor twice in one group would be updated twice per step: refuse it by name
    (torch.optim only warns)."""
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(f"{name_of(i)} is the same tensor as {name_of(seen[id(p)])} in one param "
                             f"group; each parameter may appear once")
        seen[id(p)] = i


# Keys every MARSM param group has had since version 0.1 (later ones get defaults on load).
_SAVED_GROUP_KEYS = ("lr", "weight_decay", "momentum", "gamma", "ns_steps", "ns_dtype", "adamw_betas",
                     "adamw_eps", "approx")


def check_loadable(state_dict: Mapping[str, Any], params: list[tuple[torch.Tensor, str]]) -> None:
    """Refuse a state dict MARSM could load but never step: another optimizer's (its groups lack
    MARS-M's keys), or one whose state tensors do not have their parameters' shapes. Parameters
    are matched to saved state in order, as ``torch.optim.Optimizer.load_state_dict`` does."""
    groups = state_dict.get("param_groups", [])
    for i, group in enumerate(groups):
        missing = [k for k in _SAVED_GROUP_KEYS if k not in group]
        if missing:
            raise ValueError(
                f"MARSM.load_state_dict: param group {i} of this state dict has no {missing}: it is another "
                f"optimizer's (keys {sorted(k for k in group if k != 'params')}). Load MARSM's own state "
                f"dict, or start MARSM fresh from the model's weights")
    saved_ids = [pid for g in groups for pid in g.get("params", [])]
    state = state_dict.get("state", {})
    for pid, (p, name) in zip(saved_ids, params, strict=False):
        for key, value in state.get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"MARSM.load_state_dict: state {key!r} of {name} has shape {tuple(value.shape)}, the "
                    f"parameter {tuple(p.shape)}: the state dict is from a differently shaped model")


def validate_options(*, on_nonfinite: str, owner_policy: str, bucket_bytes: int,
                     overlap: bool = True, ns_team_max: int = 1) -> None:
    """Check the optimizer-wide (not per-group) options."""
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'raise' or 'skip')")
    if owner_policy not in OWNER_POLICIES:
        raise ValueError(f"Invalid owner_policy: {owner_policy!r} (expected one of {OWNER_POLICIES})")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 4:
        raise ValueError(f"Invalid bucket_bytes: {bucket_bytes!r} (expected an int >= 4)")
    if not isinstance(overlap, bool):
        raise ValueError(f"Invalid overlap: {overlap!r} (expected True or False)")
    if (isinstance(ns_team_max, bool) or not isinstance(ns_team_max, int) or ns_team_max < 1
            or ns_team_max & (ns_team_max - 1)):
        raise ValueError(f"Invalid ns_team_max: {ns_team_max!r} (expected a power of two: 1, 2, 4, 8, ...)")


# Checks on how an optimizer was built, registered by adapters (a trainer that hands MARSM groups
# it cannot route, say). Each gets the param groups after construction and raises to refuse them.
_BUILD_CHECKS: list[Callable[[list[dict[str, Any]]], None]] = []


def register_build_check(check: Callable[[list[dict[str, Any]]], None]) -> None:
    """Run ``check(param_groups)`` at the end of every ``MARSM(...)`` (idempotent)."""
    if check not in _BUILD_CHECKS:
        _BUILD_CHECKS.append(check)


def run_build_checks(param_groups: list[dict[str, Any]]) -> None:
    """Run the registered construction checks (see :func:`register_build_check`)."""
    for check in _BUILD_CHECKS:
        check(param_groups)


# Names other optimizers use for what MARSM calls otherwise (torch.optim.AdamW, torch.optim.Muon).
_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps", "beta": "momentum", "ns_coeffs": "ns_coefficients",
            "nesterov": None, "adjust_lr_fn": None}


def check_keywords(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse keywords ``cls.__init__`` does not take, naming the valid ones and the likely meant
    one, before Python's bare "unexpected keyword argument" (which names neither)."""
    params = inspect.signature(cls.__init__).parameters
    valid = [n for n, p in params.items() if n not in ("self", "params") and p.kind is not p.VAR_KEYWORD]
    unknown = [k for k in kwargs if k not in params]
    if not unknown:
        return
    hints = []
    for k in unknown:
        meant = _ALIASES.get(k, next(iter(difflib.get_close_matches(k, valid, n=1, cutoff=0.6)), None))
        if meant is not None:
            hints.append(f"{k!r}: did you mean {meant!r}?")
        elif k in _ALIASES:
            hints.append(f"{k!r}: MARS-M has no such option")
    raise TypeError(f"{cls.__name__} got unexpected keyword argument(s) {unknown}"
                    + (f" ({'; '.join(hints)})" if hints else "") + f"; valid: {valid}")


def warn_shape_routing(param_groups: list[dict[str, Any]]) -> None:
    """Warn (once per call site) when bare tensors in a group without ``use_marsm`` send their 2-D
    ones to MARS-M by shape: the embedding and the output head would take it too."""
    if any(g["use_marsm"] is None and "param_names" not in g and any(p.dim() >= 2 for p in g["params"])
           for g in param_groups):
        warnings.warn(
            "MARSM got bare tensors in a group without 'use_marsm': every tensor with 2+ dims takes the "
            "MARS-M update by its shape, the token embedding and the output head included (the paper's "
            "recipes give them AdamW). Build the groups with marsm_dist.param_groups(model), or set "
            "'use_marsm' in each group to choose yourself.", UserWarning, stacklevel=3)
