"""Which sharding plans a ``MARSM`` keeps, and when it drops them: the plan-cache half of the
optimizer (``optimizer.py`` holds construction, options and the step).

A plan (a :class:`~marsm_dist._param_map.ParamMap`) is built for a set of param groups on the
first step that steps them, and kept: DeepSpeed's ZeRO wrappers step one group at a time, and a
rebuild would re-plan and re-check the plan with a collective on every call. A plan holds
process groups of its own (teams, replica groups over several mesh dims); a dropped plan
releases them, at a point every rank reaches alike (a step, or a framework setting
``process_group``), and a group no kept plan uses is destroyed.
"""

from __future__ import annotations

from typing import Any

from ._param_map import ParamMap

__all__ = ["PlanCacheMixin"]

_MAX_CONTEXTS = 64  # sharding contexts kept per optimizer (one per set of stepped groups)


class PlanCacheMixin:
    """``process_group`` and the plans per set of param groups (used by ``MARSM``)."""

    param_groups: list[dict[str, Any]]
    owner_policy: str
    overlap: bool
    ns_team_max: int
    _bucket_numel: int
    _timer: Any
    _contexts: dict[tuple, ParamMap]
    _context: ParamMap | None
    _process_group: Any
    init_state: Any  # StateMixin's (MARSM inherits both)

    @property
    def process_group(self) -> Any:
        """The group plain parameters are replicated over (see the class docstring), or None."""
        return self._process_group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        # Frameworks set it after construction (DeepSpeed ZeRO-0): plans made so far are stale.
        self._process_group = group
        self._drop_contexts(list(self._contexts.values()))
        self._contexts, self._context = {}, None

    def _sharding(self) -> ParamMap:
        """The parameter map for the current param groups. DeepSpeed's ZeRO wrappers step one
        group at a time (param_groups is swapped per call), so maps are kept per set of groups: a
        rebuild would re-plan and re-verify the plan with a collective on every call."""
        key = ParamMap.key_of(self.param_groups)
        ctx = self._contexts.get(key)
        if ctx is None or not ctx.serves(self.param_groups):
            new = ParamMap(self.param_groups, process_group=self.process_group,
                           owner_policy=self.owner_policy, bucket_numel=self._bucket_numel,
                           timer=self._timer, overlap=self.overlap, max_team=self.ns_team_max)
            stale = [ctx] if ctx is not None else []
            if len(self._contexts) >= _MAX_CONTEXTS:  # groups were rebuilt; forget old layouts
                stale = list(self._contexts.values())
                self._contexts.clear()
            ctx = self._contexts[key] = new
            # Dropped after the new map exists, so the sub-groups both use are kept, not remade.
            self._drop_contexts(stale)
            # Parameters swapped in after construction (accelerate's prepare puts FSDP2's DTensors
            # into the groups): every state key now, on every rank, as at construction.
            if any(adapter.prepopulate_state for adapter in ctx.adapters.values()):
                self.init_state()
        self._context = ctx
        return ctx

    @staticmethod
    def _drop_contexts(stale: list[ParamMap]) -> None:
        """Release the process groups of maps no step will use again (every rank of their job
        groups gets here at the same point: a step, or a framework setting ``process_group``)."""
        for ctx in stale:
            ctx.close()

