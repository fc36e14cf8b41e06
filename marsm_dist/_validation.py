"""Checks on how MARSM is built, in torch.optim's voice: name the argument, show the value.

The constructor's arguments bound and refused by name (from the table in :mod:`marsm_dist.options`,
which also checks each value), and the structural checks made when groups are added: a parameter
MARS-M cannot take, a tensor twice in a group, bare tensors routed by shape.
"""

from __future__ import annotations

import difflib
import inspect
import textwrap
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .functional import takes_marsm
from .options import ARGUMENTS

__all__ = ["bind_arguments", "check_no_duplicates", "check_param", "constructor_signature", "docstring_args",
           "warn_shape_routing"]


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


def warn_shape_routing(param_groups: list[dict[str, Any]]) -> None:
    """Warn (once per call site) when bare tensors in a group without ``use_marsm`` send their 2-D
    ones to MARS-M by shape: the embedding and the output head would take it too."""
    if any(g["use_marsm"] is None and "param_names" not in g
           and any(takes_marsm(None, p.shape, g.get("experts", False)) for p in g["params"])
           for g in param_groups):
        warnings.warn(
            "MARSM got bare tensors in a group without 'use_marsm': every tensor with 2+ dims takes the "
            "MARS-M update by its shape, the token embedding and the output head included (the paper's "
            "recipes give them AdamW). Build the groups with marsm_dist.param_groups(model) (under the "
            "Hugging Face Trainer: optimizer_cls_and_kwargs=(MARSMForTrainer, {...}), from "
            "marsm_dist.adapters.hf), or set 'use_marsm' in each group to choose yourself.",
            UserWarning, stacklevel=3)


# Names other optimizers use for what MARSM calls otherwise (torch.optim.AdamW, torch.optim.Muon).
_ALIASES = {"betas": "adamw_betas", "eps": "adamw_eps", "beta": "momentum", "ns_coeffs": "ns_coefficients",
            "nesterov": None, "adjust_lr_fn": "lr_scale"}


def constructor_signature() -> inspect.Signature:
    """``MARSM(params, lr, ..., approx, *, ns_coefficients, ...)``: the constructor's signature."""
    kinds = {True: inspect.Parameter.POSITIONAL_OR_KEYWORD, False: inspect.Parameter.KEYWORD_ONLY}
    params = [inspect.Parameter("params", kinds[True], annotation="ParamsT")]
    params += [inspect.Parameter(o.name, kinds[o.positional], default=o.default, annotation=o.annotation)
               for o in ARGUMENTS]
    return inspect.Signature(params, return_annotation=None)


def bind_arguments(cls_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument's value (defaults filled in) from ``MARSM``'s ``*args, **kwargs``
    (``params`` excluded); an unknown keyword gets MARSM's own error with the likely meant name."""
    valid = [o.name for o in ARGUMENTS]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            meant = _ALIASES.get(k, next(iter(difflib.get_close_matches(k, valid, n=1, cutoff=0.6)), None))
            if meant is not None:
                hints.append(f"{k!r}: did you mean {meant!r}?")
            elif k in _ALIASES:
                hints.append(f"{k!r}: MARS-M has no such option")
        raise TypeError(f"{cls_name} got unexpected keyword argument(s) {unknown}"
                        + (f" ({'; '.join(hints)})" if hints else "") + f"; valid: {valid}")
    positional = [o.name for o in ARGUMENTS if o.positional]
    if len(args) > len(positional):
        raise TypeError(f"{cls_name} takes at most {len(positional) + 1} positional arguments (params, "
                        f"{', '.join(positional)}); got {len(args) + 1}")
    values = {o.name: o.default for o in ARGUMENTS}
    for name, value in zip(positional, args, strict=False):
        if name in kwargs:
            raise TypeError(f"{cls_name} got multiple values for argument {name!r}")
        values[name] = value
    values.update(kwargs)
    return values


def docstring_args() -> str:
    """The Args entries of ``MARSM``'s docstring, one per constructor argument."""
    lines = []
    for o in ARGUMENTS:
        default = "256 MiB" if o.name == "bucket_bytes" else repr(o.config_default)
        lines.append(textwrap.fill(f"{o.name}: {o.doc} Default: {default}.", 100, initial_indent=" " * 8,
                                   subsequent_indent=" " * 12))
    return "\n".join(lines)
