"""``MARSM``: the MARS-M optimizer as a ``torch.optim.Optimizer`` (spec: marsm-algorithm.md)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._optimizer_state import StateMixin
from ._param_map import ParamMap
from ._plan_cache import PlanCacheMixin
from ._step import (
    adamw_step,
    finish_matrices,
    orthogonalize_and_apply,
    update_momenta,
)
from ._step_checks import UNTOUCHED, local_problem, stale_shards, warn_no_gradients
from ._step_inputs import (
    GroupWork,
    collect,
    describe_nonfinite,
    param_name,
)
from ._step_statistics import step_statistics
from ._timing import PhaseTimer
from ._validation import (
    check_keywords,
    check_no_duplicates,
    check_param,
    resolve_dtype,
    restore_group_types,
    run_build_checks,
    validate_hyperparameters,
    validate_options,
    warn_shape_routing,
)
from .newton_schulz import NS_COEFFICIENTS
from .sharding.adapter import adapter_for
from .stats import StepStats

__all__ = ["MARSM", "NonFiniteGradError", "StepStats"]

logger = logging.getLogger(__name__)




class NonFiniteGradError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


class MARSM(PlanCacheMixin, StateMixin, Optimizer):
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
        lr: learning rate, shared by both branches (default 1e-3).
        weight_decay: decoupled weight decay, multiplied by the unscaled lr (default 0.1).
        momentum: EMA factor of the matrix momentum, in [0, 1) (default 0.95).
        gamma: variance-reduction strength (default 0.025).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: Newton-Schulz compute dtype (default ``torch.bfloat16``; a name such as
            ``"float32"`` is accepted).
        adamw_betas: (beta1, beta2) of the AdamW branch (default (0.9, 0.95)).
        adamw_eps: eps of the AdamW branch (default 1e-8).
        approx: True for the approximate correction (P = last gradient, one backward per
            step); False for the exact one (call :meth:`store_lookahead_grad` before each step).
        ns_coefficients: the quintic's (a, b, c).
        flatten: orthogonalize tensors with more than 2 dims as ``(dim0, rest)`` matrices, with
            the scale taken from that shape (the common Muon convention). The default follows the
            spec: a batch of trailing 2-D matrices normalized by the whole-tensor norm, scale from
            the first two dims.
        maximize: maximize the objective instead of minimizing it.
        ns_form: how Newton-Schulz is evaluated: ``"plain"`` (the spec's loop), ``"gram"`` (the
            same iteration on the small Gram factor: fewer FLOPs on rectangular matrices) or
            ``"auto"`` (default: Gram only in float32/float64 where it is clearly cheaper; bf16
            always plain). See :func:`marsm_dist.newton_schulz`.
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradError` naming the
            parameter when a gradient holds NaN/Inf; ``"skip"`` skips the whole step instead.
            Either way parameters and state are left untouched (on every rank, when sharded).
        owner_policy: sharded matrices only: which rank orthogonalizes each matrix.
            ``"balanced"`` (default) chooses owners and exchange rounds together so that every
            owner has about the same Newton-Schulz work in every round (a round waits for its
            busiest owner); ``"round_robin"`` gives matrix i to rank i mod W (the paper's scheme).
        bucket_bytes: the unit of the step's extra memory (default 256 MiB, counted as float32
            elements): at most this much of full matrices owned by one rank per exchange round
            (sharded) or per Newton-Schulz batch (unsharded), and of each chunk of elementwise
            temporaries. The step's peak extra memory is about this plus the Newton-Schulz
            temporaries of one bucket, whatever the model size.
        overlap: sharded matrices only: pipeline the exchange rounds, so one round's gather and
            the previous round's scatter are in flight while a round is orthogonalized (default
            True). It holds about one more bucket; ``False`` runs them one after another.
        ns_team_max: sharded matrices only: where the plan leaves ranks idle for the whole step
            (more ranks than owners: e.g. Llama-3-8B at W=512), up to this many ranks (a power of
            two, consecutive ranks) split the busiest owners' matrices' Newton-Schulz by columns,
            with an all-reduce of the m x m Gram matrix per iteration. Default 1: whole-matrix
            ownership. 8 (one node) cuts the Newton-Schulz critical path of Llama-3-8B at W=512
            from 4.2x to 1.6x the balanced ideal (``benchmarks/scale_model.py``).
        timing: synchronize the device around each phase so :attr:`last_step_stats` times are
            exact on GPUs (costs a little speed; on the CPU they are exact anyway).
        process_group: the group over which plain (non-DTensor) parameters are replicated, as
            in torch DDP (``torch.distributed.group.WORLD`` for a plain DDP job). Each matrix
            then gets one owner rank in the group, which runs its Newton-Schulz and sends the
            result to the others; every replica ends bitwise identical. ``None`` (default): each
            process orthogonalizes its own tensors. DeepSpeed ZeRO-0 and Megatron without the
            distributed optimizer set it for you.

    Sharded parameters (FSDP2 DTensors on any mesh: 1-D, HSDP, FSDP x TP; and the frameworks
    whose adapters are imported) need no change: every rank does the elementwise work on its own
    shard, each matrix is gathered to one owner rank in the whole job for Newton-Schulz and the
    result comes back to every rank that holds a piece of it (see ``marsm_dist.sharding``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> MARSM:
        check_keywords(cls, kwargs)  # MARSM's own message, before Python's bare TypeError
        return super().__new__(cls)

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        gamma: float = 0.025,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str = torch.bfloat16,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        approx: bool = True,
        *,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        flatten: bool = False,
        maximize: bool = False,
        ns_form: str = "auto",
        on_nonfinite: str = "raise",
        owner_policy: str = "balanced",
        bucket_bytes: int = 256 * 2**20,
        timing: bool = False,
        process_group: Any = None,
        overlap: bool = True,
        ns_team_max: int = 1,
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, gamma=gamma,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, adamw_betas=adamw_betas,
                        adamw_eps=adamw_eps, approx=approx, ns_coefficients=ns_coefficients,
                        flatten=flatten, maximize=maximize, use_marsm=None, ns_form=ns_form, experts=False)
        validate_hyperparameters(defaults)  # before any conversion: a scalar "pair" is named, not iterated
        restore_group_types(defaults)
        validate_options(on_nonfinite=on_nonfinite, owner_policy=owner_policy, bucket_bytes=bucket_bytes,
                         overlap=overlap, ns_team_max=ns_team_max)
        self.overlap, self.ns_team_max = overlap, ns_team_max
        self.on_nonfinite, self.owner_policy, self.bucket_bytes = on_nonfinite, owner_policy, bucket_bytes
        self._process_group = process_group
        self._unscreened: set[int] = set()  # parameters whose loaded state no step has screened yet
        self._warned_no_grad = False
        self.skipped_steps = 0
        self.last_step_stats: StepStats | None = None
        self._stepped_this_step: set[int] = set()  # ids of the parameters this training step stepped
        self._timer = PhaseTimer(_device_sync() if timing else None)
        self._context: ParamMap | None = None  # the one the last step used
        self._contexts: dict[tuple, ParamMap] = {}
        super().__init__(params, defaults)
        run_build_checks(self.param_groups)
        warn_shape_routing(self.param_groups)
        # Sharded frameworks that keep their parameters (FSDP2) get every state key now, so
        # checkpoint helpers see rank-symmetric keys and never run a dummy step.
        if any(adapter_for(p).prepopulate_state for g in self.param_groups for p in g["params"]):
            self.init_state()
            # And plan now: a layout no step could serve (matrices on different meshes) is refused
            # at construction, which every rank runs (the plan check is a collective).
            self._sharding()

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
            validate_hyperparameters(group, f" in param group {len(self.param_groups) - 1}")
            group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
            for i, p in enumerate(group["params"]):
                check_param(p, group, param_name(self.param_groups, group, i),
                            [s.shape for s in self._slots_of(p)])
        except ValueError:
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Take one optimization step; ``closure`` (optional) re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ctx = self._sharding()
        timer = self._timer
        timer.reset()
        sent0, received0 = ctx.distributor.exchanged_bytes()
        chunk = self._bucket_numel
        with timer.phase("elementwise"):
            matrix, adamw = collect(self.param_groups, ctx.adapter, ctx.slots, ctx.is_shared_matrix)
            for work in matrix + adamw:
                for p in work.containers():
                    self._ensure_state(work.group, p)
        # Writes nothing: the group values' checks and the statistics, with the step's one
        # device-to-host read. A refusal there stops every rank (it rides on the all-reduce).
        problem = local_problem(self.param_groups, matrix, self.state) or stale_shards(ctx, matrix)
        if problem is not None and ctx.distributor.group is None:
            raise problem
        stepped = [p for work in matrix + adamw for p in work.containers()]
        if not stepped:
            self._warn_no_gradients()
        screen = any(id(p) in self._unscreened for p in stepped)
        stats = step_statistics(ctx, matrix, adamw, self.state, chunk, timer, param_groups=self.param_groups,
                                problem=None if problem is None else str(problem), screened_state=screen)
        if stats.refusal is None and not stats.finite:  # rare: a float32 overflow, or a NaN/Inf?
            stats = step_statistics(ctx, matrix, adamw, self.state, chunk, timer, precise=True,
                                    param_groups=self.param_groups, screened_state=screen)
        if stats.refusal is not None:
            raise problem or ValueError(f"MARSM: {stats.refusal}; {UNTOUCHED}")
        if not stats.finite:
            bad = describe_nonfinite(self.param_groups, matrix, adamw, self.state, stats.sq_norms,
                                     stats.local_sq_norms(), screen)
            if self.on_nonfinite == "raise":
                raise NonFiniteGradError(
                    f"MARSM: the {bad} contains NaN or Inf; parameters and optimizer state were "
                    "left untouched. Pass on_nonfinite='skip' to skip such steps instead."
                )
            self._skip_step(matrix, bad)
            return loss
        with timer.phase("elementwise"):
            for work in adamw:
                adamw_step(work, self.state, chunk, stats.values(work.group))
            update_momenta(matrix, stats, self.state, chunk)
        orthogonalize_and_apply(ctx, matrix, stats, self.state, timer)
        finish_matrices(matrix, stats, self.state)
        self._unscreened.difference_update(id(p) for p in stepped)
        self._record_stats(ctx, stats, sent0, received0)
        return loss

    def _warn_no_gradients(self) -> None:
        if not self._warned_no_grad and any(g["params"] for g in self.param_groups):
            self._warned_no_grad = True
            warn_no_gradients()

    @property
    def _bucket_numel(self) -> int:
        """``bucket_bytes`` in elements (counted as float32): the step's unit of extra memory."""
        return max(1, self.bucket_bytes // 4)

    def _skip_step(self, matrix: list[GroupWork], bad: str) -> None:
        self.skipped_steps += 1
        logger.warning("MARSM: skipped a step because the %s contains NaN or Inf", bad)
        for work in matrix:
            for p in work.params:
                if "lookahead_ready" in self.state[p]:
                    self.state[p]["lookahead_ready"] = False

    def _record_stats(self, ctx: ParamMap, stats: Any, sent0: int, received0: int) -> None:
        sent, received = ctx.distributor.exchanged_bytes()
        call = StepStats(
            milliseconds=self._timer.milliseconds(), bytes_sent=sent - sent0,
            bytes_received=received - received0, clipped=stats.clipped,
            ns_flops_this_rank=stats.ns_flops, ns_flops_max_over_mean=ctx.distributor.flops_balance,
            owned_matrices=ctx.distributor.owned_matrices, sharded_matrices=len(ctx.distributor.shared),
        )
        # One training step may be several calls, one per set of groups (DeepSpeed's ZeRO): add
        # them up until a call steps a parameter this step has stepped already: the next step.
        if self.last_step_stats is None or not ctx.param_ids.isdisjoint(self._stepped_this_step):
            self._stepped_this_step = set(ctx.param_ids)
        else:
            call = self.last_step_stats + call
            self._stepped_this_step |= ctx.param_ids
        self.last_step_stats = call
        logger.debug("MARSM step: %s", self.last_step_stats)


def _device_sync() -> Callable[[], None] | None:
    return torch.cuda.synchronize if torch.cuda.is_available() else None


# inspect.signature(MARSM) would show __new__'s (*args, **kwargs): show the constructor's arguments.
MARSM.__signature__ = inspect.signature(MARSM.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(MARSM.__init__).parameters.values())[1:])
