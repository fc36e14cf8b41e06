"""``MARSM``: the MARS-M optimizer as a ``torch.optim.Optimizer`` (the algorithm: docs/algorithm.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._optimizer_state import StateMixin
from ._step_guards import check_step, describe_nonfinite, warn_no_gradients
from ._step_phases import apply_step
from ._step_work import GroupWork, StepMap, StepWork, param_name, routes_to_marsm
from ._timing import PhaseTimer
from ._validation import (
    bind_arguments,
    check_no_duplicates,
    check_param,
    constructor_signature,
    docstring_args,
    warn_shape_routing,
)
from .options import (
    INSTANCE_ATTRIBUTES,
    group_defaults,
    resolve_dtype,
    restore_group_types,
    validate_group,
    validate_optimizer_options,
)
from .sharding.adapter import Slot, adapter_for
from .stats import StepStats

__all__ = ["MARSM", "NonFiniteGradError", "StepStats"]

logger = logging.getLogger(__name__)

_MAX_MAPS = 64  # step maps kept per optimizer (one per set of stepped groups)


class NonFiniteGradError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


class MARSM(StateMixin, Optimizer):
    """MARS-M: variance-reduced momentum with Newton-Schulz orthogonalized updates for matrices.

    Matrix parameters (``use_marsm=True`` groups, or ``ndim >= 2`` in groups without the key)::

        c = g + kappa (g - P),  kappa = gamma momentum / (1 - momentum)
        c = c / ||c||_F  if ||c||_F > 1
        M = momentum M + (1 - momentum) c
        W = W (1 - lr weight_decay) - lr 0.2 sqrt(max(A, B)) NS(M)

    P is the previous step's gradient (``approx=True``) or the look-ahead gradient stored with
    :meth:`store_lookahead_grad` before the previous step (``approx=False``); P = 0 at step 1.
    Everything else (``use_marsm=False`` groups, 0-D/1-D tensors) takes the AdamW branch, whose eps
    is added to the uncorrected sqrt(v). Use :func:`marsm_dist.param_groups` to send embeddings and
    the output head to the AdamW branch, as the paper's recipes do.

    Args:
        params: parameters, named parameters, or param groups. A group may override any
            hyperparameter below and carry ``"use_marsm"`` and ``"experts"`` (True: dim 0 indexes MoE
            experts, each stepped as a separate matrix; set by :func:`marsm_dist.param_groups`).
{args}

    Sharded parameters (FSDP2 DTensors on any mesh: 1-D, HSDP, FSDP x TP; and the frameworks
    whose adapters are imported) need no change: every rank does the elementwise work on its own
    shard, each matrix is gathered to one owner rank in the whole job for Newton-Schulz and the
    result comes back to every rank that holds a piece of it (see ``marsm_dist.sharding``).
    """

    def __init__(self, params: ParamsT, *args: Any, **kwargs: Any) -> None:
        # The arguments, their defaults and checks are defined once, in marsm_dist.options.
        values = bind_arguments(type(self).__name__, args, kwargs)
        defaults = group_defaults()
        defaults.update((k, values[k]) for k in defaults if k in values)
        validate_group(defaults)  # before any conversion: a scalar "pair" is named, not iterated
        restore_group_types(defaults)
        validate_optimizer_options(values)
        for attribute, option in INSTANCE_ATTRIBUTES.items():
            setattr(self, attribute, values[option.name])
        self._unscreened: set[int] = set()  # parameters whose loaded state no step has screened yet
        self._warned_no_grad = False
        self.skipped_steps = 0
        self.last_step_stats: StepStats | None = None
        self._stepped_this_step: set[int] = set()  # ids of the parameters this training step stepped
        self._timer = PhaseTimer(_device_sync() if values["timing"] else None)
        self._step_map: StepMap | None = None  # the one the last step used
        self._step_maps: dict[tuple, StepMap] = {}  # kept per set of param groups
        super().__init__(params, defaults)
        warn_shape_routing(self.param_groups)
        # Sharded frameworks that keep their parameters (FSDP2) get every state key now, so
        # checkpoint helpers see rank-symmetric keys and never run a dummy step.
        if any(adapter_for(p).prepopulate_state for g in self.param_groups for p in g["params"]):
            self.init_state()
            # And plan now: a layout no step could serve (matrices on different meshes) is refused
            # at construction, which every rank runs (the plan check is a collective).
            self._map_groups()

    # ---------------------------------------------------- what a step keeps between steps
    # A step map (a :class:`~marsm_dist._step_work.StepMap`: adapters, slots, the sharding plan) is
    # built on the first step that steps a set of param groups, and kept: DeepSpeed's ZeRO wrappers
    # step one group at a time, and a rebuild would re-plan and re-check the plan with a collective
    # on every call. A map holds process groups of its own (teams, replica groups over several mesh
    # dims); a dropped map releases them, at a point every rank reaches alike (a step, or a framework
    # setting ``process_group``), and a group no kept map uses is destroyed.
    @property
    def process_group(self) -> Any:
        """The group plain parameters are replicated over (see the class docstring), or None."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        # Frameworks set it after construction (DeepSpeed ZeRO-0): maps made so far are stale.
        self._process_group = group
        self._drop_maps(list(self._step_maps.values()))
        self._step_maps, self._step_map = {}, None

    def _map_groups(self) -> StepMap:
        """The step map of the current param groups (built on first use, then kept per set)."""
        key = StepMap.key_of(self.param_groups)
        step_map = self._step_maps.get(key)
        if step_map is None or not step_map.serves(self.param_groups):
            new = StepMap(self.param_groups, process_group=self.process_group,
                          owner_policy=self.owner_policy, bucket_numel=self._bucket_numel,
                          timer=self._timer, overlap=self.overlap, max_team=self.ns_team_max,
                          pin_memory=self.pin_memory)
            stale = [step_map] if step_map is not None else []
            if len(self._step_maps) >= _MAX_MAPS:  # groups were rebuilt; forget old layouts
                stale = list(self._step_maps.values())
                self._step_maps.clear()
            step_map = self._step_maps[key] = new
            # Dropped after the new map exists, so the sub-groups both use are kept, not remade.
            self._drop_maps(stale)
            # Parameters swapped in after construction (accelerate's prepare puts FSDP2's DTensors
            # into the groups): every state key now, on every rank, as at construction.
            if any(adapter.prepopulate_state for adapter in step_map.adapters.values()):
                self.init_state()
        self._step_map = step_map
        return step_map

    @property
    def _bucket_numel(self) -> int:
        """``bucket_bytes`` in elements (counted as float32): the step's unit of extra memory."""
        return max(1, self.bucket_bytes // 4)

    @staticmethod
    def _drop_maps(stale: list[StepMap]) -> None:
        for step_map in stale:
            step_map.close()

    @staticmethod
    def uses_marsm(group: dict[str, Any], slot: Slot) -> bool:
        """True if ``slot`` takes the matrix update in ``group`` (the key, else >= 2 dims)."""
        return routes_to_marsm(group, slot)

    def _slots_of(self, p: Tensor) -> list[Slot]:
        step_map = self.__dict__.get("_step_map")
        if step_map is not None and id(p) in step_map.slot_lists:
            return step_map.slot_lists[id(p)]
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``); its hyperparameters are validated."""
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):  # (torch refuses a set and wraps a lone tensor)
            # Checked before torch's own check too, which only warns that it "will cause an error".
            param_group["params"] = params = list(params)
            gi = len(self.param_groups)
            named = [p if isinstance(p, tuple) else (f"param_groups[{gi}]['params'][{i}]", p)
                     for i, p in enumerate(params)]  # (name, tensor) pairs, as torch accepts them
            check_no_duplicates([t for _, t in named], lambda i: repr(named[i][0]) if isinstance(
                params[i], tuple) else named[i][0])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_no_duplicates(group["params"], lambda i: param_name(self.param_groups, group, i))
            restore_group_types(group)
            validate_group(group, f" in param group {len(self.param_groups) - 1}")
            group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
            for i, p in enumerate(group["params"]):
                check_param(p, group, param_name(self.param_groups, group, i),
                            [s.shape for s in self._slots_of(p)])
        except ValueError:
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Take one optimization step; ``closure`` (optional) re-evaluates and returns the loss.

        The step's three parts: collect the work (``_step_work``), pass every guard before the
        first write (``_step_guards``: checks and statistics, one all-reduce, one host read),
        then write (``_step_phases``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step_map, timer = self._map_groups(), self._timer
        timer.reset()
        sent0, received0 = step_map.distributor.exchanged_bytes()
        with timer.phase("elementwise"):
            work = step_map.collect(self.param_groups, self._bucket_numel)
            for work_of_group in work.matrix + work.adamw:
                for p in work_of_group.containers():
                    self._ensure_state(work_of_group.group, p)
        stepped = work.containers()
        if not stepped:
            self._warn_no_gradients()
        screen = any(id(p) in self._unscreened for p in stepped)
        stats = check_step(work, self.param_groups, self.state, timer, screened_state=screen)
        if not stats.finite:
            bad = describe_nonfinite(work, self.state, stats, screen)
            if self.on_nonfinite == "raise":
                raise NonFiniteGradError(
                    f"MARSM: the {bad} contains NaN or Inf; parameters and optimizer state were "
                    "left untouched. Pass on_nonfinite='skip' to skip such steps instead."
                )
            self._skip_step(work.matrix, bad)
            return loss
        apply_step(work, stats, self.state, timer, fused=self.fused)
        self._unscreened.difference_update(id(p) for p in stepped)
        self._record_stats(work, stats, sent0, received0)
        return loss

    def _warn_no_gradients(self) -> None:
        if not self._warned_no_grad and any(g["params"] for g in self.param_groups):
            self._warned_no_grad = True
            warn_no_gradients()

    def _skip_step(self, matrix: list[GroupWork], bad: str) -> None:
        self.skipped_steps += 1
        logger.warning("MARSM: skipped a step because the %s contains NaN or Inf", bad)
        for work in matrix:
            for p in work.params:
                if "lookahead_ready" in self.state[p]:
                    self.state[p]["lookahead_ready"] = False

    def _record_stats(self, work: StepWork, stats: Any, sent0: int, received0: int) -> None:
        step_map = work.step_map
        sent, received = step_map.distributor.exchanged_bytes()
        call = StepStats(
            milliseconds=self._timer.milliseconds(), bytes_sent=sent - sent0,
            bytes_received=received - received0, clipped=stats.clipped,
            ns_flops_this_rank=stats.ns_flops, ns_flops_max_over_mean=step_map.distributor.flops_balance,
            owned_matrices=step_map.distributor.owned_matrices,
            sharded_matrices=len(step_map.distributor.shared),
        )
        # One training step may be several calls, one per set of groups (DeepSpeed's ZeRO): add
        # them up until a call steps a parameter this step has stepped already: the next step.
        if self.last_step_stats is None or not step_map.param_ids.isdisjoint(self._stepped_this_step):
            self._stepped_this_step = set(step_map.param_ids)
        else:
            call = self.last_step_stats + call
            self._stepped_this_step |= step_map.param_ids
        self.last_step_stats = call
        logger.debug("MARSM step: %s", self.last_step_stats)


def _device_sync() -> Callable[[], None] | None:
    return torch.cuda.synchronize if torch.cuda.is_available() else None


MARSM.__signature__ = constructor_signature()  # type: ignore[attr-defined]
MARSM.__doc__ = (MARSM.__doc__ or "").replace("{args}", docstring_args())
