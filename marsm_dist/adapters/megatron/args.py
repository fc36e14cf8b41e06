"""``--marsm-*`` command-line flags for Megatron-LM's ``extra_args_provider``, and what they select."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_marsm_args", "marsm_kwargs_from_args"]


def add_marsm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--marsm-*`` flags for Megatron-LM's ``extra_args_provider`` (mirroring ``--muon-*``)."""
    g = parser.add_argument_group("MARS-M")
    g.add_argument("--marsm-momentum", type=float, default=0.95)
    g.add_argument("--marsm-gamma", type=float, default=0.025)
    g.add_argument("--marsm-ns-steps", type=int, default=5)
    g.add_argument("--marsm-ns-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--marsm-owner-policy", choices=["balanced", "round_robin"], default="balanced")
    g.add_argument("--marsm-split-qkv", action="store_true",
                   help="orthogonalize Q, K, V of each query group separately")
    return parser


def marsm_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The MARSM keyword arguments that :func:`add_marsm_args`'s flags select."""
    return dict(momentum=args.marsm_momentum, gamma=args.marsm_gamma, ns_steps=args.marsm_ns_steps,
                ns_dtype=args.marsm_ns_dtype,
                owner_policy=args.marsm_owner_policy, split_qkv=args.marsm_split_qkv)
