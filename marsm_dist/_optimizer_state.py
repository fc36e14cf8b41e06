"""What ``MARSM`` keeps per parameter, and how it is saved and loaded: the state half of the
optimizer (``optimizer.py`` holds construction, options and the step).

``MARSM`` inherits these methods from :class:`StateMixin`; they rely only on
``torch.optim.Optimizer``'s ``param_groups`` and ``state``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._step_inputs import check_grad, param_name, routes_to_marsm
from ._timing import PhaseTimer
from ._validation import check_loadable, dtype_name, restore_group_types
from .newton_schulz import NS_COEFFICIENTS
from .sharding.adapter import Slot, adapter_for

__all__ = ["GROUP_DEFAULTS", "StateMixin"]

# Keys a param group may carry, with the values a group added by an older version should get.
GROUP_DEFAULTS = dict(ns_coefficients=NS_COEFFICIENTS, flatten=False, maximize=False, use_marsm=None,
                      ns_form="auto", experts=False)

# Optimizer-wide attributes, with the values an optimizer pickled by an older version gets.
_ATTRIBUTE_DEFAULTS = dict(on_nonfinite="raise", owner_policy="balanced", bucket_bytes=256 * 2**20,
                           overlap=True, ns_team_max=1, skipped_steps=0, last_step_stats=None,
                           _context=None, _process_group=None, _warned_no_grad=False)


class StateMixin:
    """Per-parameter state (created lazily or all at once), the look-ahead store of the exact
    mode, and ``state_dict`` / ``load_state_dict`` / unpickling."""

    param_groups: list[dict[str, Any]]
    state: Any

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also how load_state_dict installs the loaded groups
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            restore_group_types(group)
        for key, value in _ATTRIBUTE_DEFAULTS.items():
            self.__dict__.setdefault(key, value)
        for key, factory in (("_contexts", dict), ("_unscreened", set), ("_stepped_this_step", set)):  # fresh
            self.__dict__.setdefault(key, factory())
        self.__dict__.setdefault("_timer", PhaseTimer())

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with plain values in the param groups (``ns_dtype`` as its name):
        ``torch.distributed.checkpoint.state_dict``'s helpers refuse a ``torch.dtype``. Loading
        turns it back into a dtype (and the tuples that came back as lists into tuples)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:  # fresh dicts, not the live groups
            if isinstance(group["ns_dtype"], torch.dtype):  # saving never validates (nor fails)
                group["ns_dtype"] = dtype_name(group["ns_dtype"])
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict`` (the checkpoint's hyperparameters, mode included, replace
        the current ones), refusing first what could only fail later: the state dict of another
        optimizer, and state tensors whose shape is not their parameter's (another model)."""
        check_loadable(state_dict, [(p, param_name(self.param_groups, g, i))
                                    for g in self.param_groups for i, p in enumerate(g["params"])])
        super().load_state_dict(state_dict)
        # Loaded state may be damaged: steps screen it for NaN/Inf (in the step's one all-reduce)
        # until each parameter has passed one; from then on finite inputs keep it finite.
        self._unscreened = {id(p) for p in self.state}

    @staticmethod
    def uses_marsm(group: dict[str, Any], slot: Slot) -> bool:
        """True if ``slot`` takes the matrix update in ``group`` (the key, else >= 2 dims)."""
        return routes_to_marsm(group, slot)

    def _slots_of(self, p: Tensor) -> list[Slot]:
        ctx = self.__dict__.get("_context")
        if ctx is not None and id(p) in ctx.slot_lists:
            return ctx.slot_lists[id(p)]
        return adapter_for(p).slots(p)

    def _ensure_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """The parameter's state, with any missing key created (zeros); existing keys untouched."""
        state = self.state[p]
        step = state.get("step")
        if step is None:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        elif not isinstance(step, Tensor) or step.device.type != "cpu":
            # Counters live on the host (each step reads them); a checkpoint may bring them elsewhere.
            state["step"] = torch.as_tensor(step, dtype=torch.float32).cpu()
        routes = {self.uses_marsm(group, s) for s in self._slots_of(p)}
        keys = ["exp_avg"]
        if True in routes:
            keys += ["last_grad"] + ([] if group["approx"] else ["lookahead_grad"])
            if not group["approx"]:
                state.setdefault("lookahead_ready", False)
        if False in routes:
            keys += ["exp_avg_sq"]
        missing = [k for k in keys if k not in state]
        if missing:
            adapter = adapter_for(p)
            for key in missing:
                state[key] = adapter.zeros_state(p)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every state tensor now (zeros), so all keys exist before the first step.

        Checkpoint helpers that need rank-symmetric keys call this instead of a dummy step.
        The FSDP2 adapter calls it at construction; ZeRO must not (it swaps parameters later).
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(group, p)

    @torch.no_grad()
    def store_lookahead_grad(self) -> None:
        """Exact mode: copy each matrix parameter's ``.grad`` as the look-ahead gradient.

        Call it after a backward pass at the *current* weights on the *next* step's batch, then
        zero the grads, compute this step's gradient and call :meth:`step`. That step still uses
        the previously stored look-ahead as P; afterwards this one becomes P. A matrix parameter
        without a gradient stores zeros.
        """
        groups = [g for g in self.param_groups if not g["approx"]]
        if not groups:
            raise RuntimeError("store_lookahead_grad() is for approx=False; every group has approx=True")
        for group in groups:
            for i, p in enumerate(group["params"]):
                if not any(self.uses_marsm(group, s) for s in self._slots_of(p)):
                    continue
                adapter = adapter_for(p)
                buf = adapter.local(self._ensure_state(group, p)["lookahead_grad"])
                if p.grad is None:
                    buf.zero_()
                else:
                    check_grad(self.param_groups, group, i, p.grad)
                    buf.copy_(adapter.local(p.grad))
                    if group["maximize"]:
                        buf.neg_()
                self.state[p]["lookahead_ready"] = True
