"""What a step checks before it writes anything, beyond the gradients: the param groups' values
(valid on this rank, and the same on every rank) and this rank's own refusals.

Schedulers and users write group values between steps (``lr`` = NaN, ``momentum`` = 1), and a
rank that computes a different value (a per-rank config) would train a diverged replica, or
abort inside the exchange. Both are folded into the step's one all-reduce: a flag for invalid
values, and per value a digest ``d`` and ``d**2``. Summed over W ranks they equal ``W d`` and
``W d**2`` only if every rank has the same ``d`` (the sum of ``(d_r - d)**2`` is then zero), and
the digests are small integers, so float64 sums are exact. Every rank sees the same verdict and
raises before anything is written, with no extra collective.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ._step_inputs import GroupWork, check_lookahead_ready
from ._validation import restore_group_types, validate_hyperparameters

__all__ = ["AGREED_KEYS", "UNTOUCHED", "agreement_terms", "disagreement", "invalid_value", "local_problem",
           "warn_no_gradients"]

UNTOUCHED = "parameters and optimizer state were left untouched"

# The values a step uses, per group.
AGREED_KEYS = ("lr", "weight_decay", "momentum", "gamma", "ns_steps", "ns_dtype", "adamw_betas", "adamw_eps",
               "approx", "ns_coefficients", "flatten", "maximize", "ns_form", "use_marsm")


def invalid_value(param_groups: Sequence[dict[str, Any]]) -> str | None:
    """The first invalid value of any group, in torch.optim's voice (None: all valid)."""
    for i, group in enumerate(param_groups):
        restore_group_types(group)
        try:
            validate_hyperparameters(group, f" in param group {i}")
        except ValueError as err:
            return str(err)
    return None


def _digest(value: Any) -> int:
    """A 20-bit fingerprint of a value (its repr), exact in float64 even squared and summed."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:3], "little") & 0xFFFFF


def agreement_terms(param_groups: Sequence[dict[str, Any]]) -> list[float]:
    """``[d, d**2]`` for every agreed value of every group, to be summed over the ranks."""
    out: list[float] = []
    for group in param_groups:
        for key in AGREED_KEYS:
            d = float(_digest(group.get(key)))
            out += [d, d * d]
    return out


def disagreement(param_groups: Sequence[dict[str, Any]], mine: list[float], summed: list[float],
                 world_size: int) -> str | None:
    """Which value differs between ranks (from this rank's terms and their sums), or None."""
    keys = [(i, key) for i in range(len(param_groups)) for key in AGREED_KEYS]
    for n, (i, key) in enumerate(keys):
        d, total, squares = mine[2 * n], summed[2 * n], summed[2 * n + 1]
        if total != world_size * d or squares != world_size * d * d:
            return (f"param group {i}'s {key!r} differs between ranks (this rank has "
                    f"{param_groups[i].get(key)!r}); every rank must step with the same values")
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


def warn_no_gradients() -> None:
    """The warning for an optimizer none of whose parameters got a gradient (given once)."""
    warnings.warn(
        "MARSM.step(): none of the optimizer's parameters has a gradient. If the model was "
        "wrapped or sharded after the optimizer was built (fully_shard, DDP, accelerate's "
        "prepare replace the parameters), the optimizer holds the old tensors: build it from "
        "the wrapped model's parameters.", stacklevel=4)
