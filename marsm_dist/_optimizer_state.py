"""What ``MARSM`` keeps per parameter, and how it is saved and loaded: the state half of the
optimizer (``optimizer.py`` holds construction, options and the step).

``MARSM`` inherits these methods from :class:`StateMixin`; they rely only on
``torch.optim.Optimizer``'s ``param_groups`` and ``state``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._step_work import check_grad, param_name
from ._timing import PhaseTimer
from .options import INSTANCE_ATTRIBUTES, SAVED_GROUP_KEYS, dtype_name, group_defaults, restore_group_types
from .sharding.adapter import adapter_for

__all__ = ["GROUP_DEFAULTS", "StateMixin"]


# Keys a param group may carry, with the values a group added by an older version should get.
GROUP_DEFAULTS = group_defaults()

# Optimizer-wide attributes, with the values an optimizer pickled by an older version gets.
_ATTRIBUTE_DEFAULTS = {**{attribute: option.default for attribute, option in INSTANCE_ATTRIBUTES.items()},
                       **dict(skipped_steps=0, last_step_stats=None, _step_map=None, _warned_no_grad=False)}


def check_loadable(state_dict: Mapping[str, Any], params: list[tuple[torch.Tensor, str]]) -> None:
    """Refuse a state dict MARSM could load but never step: another optimizer's (its groups lack
    MARS-M's keys), or one whose state tensors do not have their parameters' shapes. Parameters
    are matched to saved state in order, as ``torch.optim.Optimizer.load_state_dict`` does."""
    groups = state_dict.get("param_groups", [])
    for i, group in enumerate(groups):
        missing = [k for k in SAVED_GROUP_KEYS if k not in group]
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


class StateMixin:
    """All state created at once (``init_state``), the look-ahead store of the exact mode, and
    ``state_dict`` / ``load_state_dict`` / unpickling. (The state a step needs is created by the
    step itself: ``MARSM._ensure_state``.)"""

    param_groups: list[dict[str, Any]]
    state: Any
    _ensure_state: Any  # MARSM's
    _slots_of: Any
    uses_marsm: Any

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also how load_state_dict installs the loaded groups
        for group in self.param_groups:
            for key, value in GROUP_DEFAULTS.items():
                group.setdefault(key, value)
            restore_group_types(group)
        for key, value in _ATTRIBUTE_DEFAULTS.items():
            self.__dict__.setdefault(key, value)
        fresh = (("_step_maps", dict), ("_unscreened", set), ("_stepped_this_step", set))
        for key, factory in fresh:
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
        self.note_state_loaded()

    def note_state_loaded(self) -> None:
        """Tell the optimizer its state (and maybe its groups) came from a checkpoint, by
        ``load_state_dict`` or a tool writing it in place (``marsm_dist.checkpoint``, DeepSpeed's
        universal loading): group values get their types back (``ns_dtype`` saved by name), and
        the state is screened for NaN/Inf (in the step's one all-reduce) until each parameter has
        passed one step; from then on finite inputs keep it finite."""
        for group in self.param_groups:
            restore_group_types(group)
        self._unscreened = {id(p) for p in self.state}

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
