"""``--marsm-*`` command-line flags for Megatron-LM's ``extra_args_provider``, and what they select.

One flag per MARSM setting a config can hold (:data:`marsm_dist.options.CONFIG_OPTIONS`), except
those Megatron's own flags already give (``--lr``, ``--weight-decay``, ``--adam-beta1/2``,
``--adam-eps``: see ``get_megatron_marsm_optimizer``) and the exact mode, which Megatron's loop
cannot run; plus ``--marsm-split-qkv``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ...options import CONFIG_OPTIONS, Option

__all__ = ["add_marsm_args", "marsm_kwargs_from_args"]

# Set from Megatron's own arguments (OptimizerConfig), or refused in Megatron's loop (approx=False).
_NOT_FLAGS = frozenset({"lr", "weight_decay", "adamw_betas", "adamw_eps", "approx"})


def _flag_options() -> list[Option]:
    return [o for o in CONFIG_OPTIONS if o.name not in _NOT_FLAGS]


def _add(group: argparse._ArgumentGroup, o: Option) -> None:
    flag = "--marsm-" + o.name.replace("_", "-")
    help_text = o.doc.replace("%", "%%")
    if o.config_type is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=o.default, help=help_text)
    elif o.parse_words is not None:  # words, parsed after argparse (e.g. a preset's name or numbers)
        group.add_argument(flag, nargs="+", default=None, help=help_text)
    elif o.arity > 1:
        group.add_argument(flag, type=float, nargs=o.arity, default=list(o.default), help=help_text)
    else:
        group.add_argument(flag, type=o.config_type, default=o.config_default, help=help_text)


def add_marsm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--marsm-*`` flags for Megatron-LM's ``extra_args_provider`` (mirroring ``--muon-*``)."""
    g = parser.add_argument_group("MARS-M")
    for o in _flag_options():
        _add(g, o)
    g.add_argument("--marsm-split-qkv", action="store_true",
                   help="orthogonalize Q, K, V of each query group separately")
    return parser


def marsm_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The MARSM keyword arguments that :func:`add_marsm_args`'s flags select."""
    kwargs: dict[str, Any] = {}
    for o in _flag_options():
        value = getattr(args, "marsm_" + o.name)
        if o.parse_words is not None:
            kwargs[o.name] = o.default if value is None else o.parse_words(value)
        else:
            kwargs[o.name] = tuple(value) if o.arity > 1 else value
    kwargs["split_qkv"] = args.marsm_split_qkv
    return kwargs
