"""The phases of one MARSM step over the work lists, on local shards.

1. :func:`precondition`: c_t = g + kappa (g - P) for every matrix (writes nothing).
2. :func:`step_statistics`: squared norms of c_t (summed over shards), which sharded matrices got
   a gradient anywhere, and a NaN/Inf screen, in one all-reduce.
3. :func:`update_momenta`, :func:`adamw_step`: elementwise updates of the state.
4. :func:`orthogonalize_all`: NS, through the sharding engine for sharded matrices.
5. :func:`apply_updates`: decay + scaled orthogonal step, then P for the next step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._sharding_context import ShardingContext
from ._step_inputs import GroupWork, nonfinite_flag, pending_lookaheads
from ._timing import PhaseTimer
from ._validation import check_ns_form
from .newton_schulz import newton_schulz_flops
from .orthogonalize import NSConfig, matrix_view_shape, orthogonalize, scale_for

EnsureState = Callable[[dict[str, Any], Tensor], dict[str, Any]]


@dataclass
class StepStats:
    """What the last step did (``MARSM.last_step_stats``), as seen by this rank.

    Attributes:
        milliseconds: wall time per phase: elementwise, communication, newton_schulz, apply.
        bytes_sent, bytes_received: bytes exchanged with other ranks (gather + scatter).
        clipped: matrices whose c_t was clipped to unit norm.
        ns_flops_this_rank: predicted Newton-Schulz FLOPs this rank runs per step.
        ns_flops_max_over_mean: the owner plan's load balance (1.0 is perfect).
        owned_matrices: sharded matrices this rank orthogonalizes.
    """

    milliseconds: dict[str, float]
    bytes_sent: int
    bytes_received: int
    clipped: int
    ns_flops_this_rank: int
    ns_flops_max_over_mean: float
    owned_matrices: int


@dataclass
class Preconditioned:
    """Per matrix work: the sign-adjusted local gradients and c_t."""

    grads: list[list[Tensor]] = field(default_factory=list)
    cs: list[list[Tensor]] = field(default_factory=list)


@dataclass
class Statistics:
    """The reduced step statistics, one entry per matrix in work order."""

    sq_norms: Tensor
    local_sq_norms: Tensor
    active: list[bool]
    finite: bool
    factors: list[float]
    clipped: int
    local_ns_flops: int


def precondition(matrix: list[GroupWork], state: Mapping, ensure_state: EnsureState) -> Preconditioned:
    pre = Preconditioned()
    for work in matrix:
        g = work.group
        for p in work.containers():
            ensure_state(g, p)
        gs = list(torch._foreach_neg(work.grads)) if g["maximize"] else work.grads
        kappa = F.marsm_kappa(float(g["momentum"]), float(g["gamma"]))
        prev = work.local_state(state, "last_grad")
        pre.grads.append(gs)
        pre.cs.append(F.variance_reduced_grads(gs, prev, kappa=kappa))
    return pre


def _config(group: dict[str, Any]) -> NSConfig:
    # "ns_form" is validated when a group is added; this catches a group edited afterwards (or
    # loaded from a state dict) in the statistics phase, before anything is written.
    form = group.get("ns_form", "auto")
    check_ns_form(form)
    return NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"], group["flatten"], form)


def _work_configs(matrix: list[GroupWork]) -> list[NSConfig]:
    """One NS config per work (group), built once per step instead of once per matrix."""
    return [_config(w.group) for w in matrix]


def step_statistics(ctx: ShardingContext, matrix: list[GroupWork], adamw: list[GroupWork],
                    pre: Preconditioned, state: Mapping) -> Statistics:
    entries = [(p, k) for w in matrix for p, (_, k) in zip(w.params, w.indices, strict=True)]
    has = [h for w in matrix for h in w.has_grad]
    sq = F.squared_norms([c for cs in pre.cs for c in cs])
    sharded = [n for n, (p, k) in enumerate(entries) if ctx.is_sharded_matrix(p, k)]
    local = [n for n, (p, k) in enumerate(entries) if not ctx.is_sharded_matrix(p, k)]
    flag = nonfinite_flag([g for w in adamw for g in w.grads] + pending_lookaheads(matrix, state))
    if local:  # a NaN/Inf among unsharded matrices must stop every rank too
        flag = flag + sq[local].sum() * 0.0
    counts = torch.tensor([float(has[k]) for k in sharded], dtype=torch.float64, device=sq.device)
    local_sq = sq.clone()
    vec = ctx.all_reduce(torch.cat([sq[sharded], counts, flag.to(sq.device)]))
    n = len(sharded)
    sq[sharded] = vec[:n]
    active = [True] * len(entries)
    for k, count in zip(sharded, vec[n:2 * n].tolist(), strict=True):
        active[k] = count > 0
    finite = bool(torch.isfinite(sq).all()) and bool(torch.isfinite(vec[-1]))
    factors = F.clip_factors(sq) if finite else []
    clipped = sum(1 for k, f in enumerate(factors) if active[k] and f < 1.0)
    configs = [(cfg, s.shape) for w, cfg in zip(matrix, _work_configs(matrix), strict=True) for s in w.slots]
    local_flops = sum(newton_schulz_flops(matrix_view_shape(configs[k][1], configs[k][0].flatten),
                                          configs[k][0].steps) for k in local if active[k])
    return Statistics(sq, local_sq, active, finite, factors, clipped, local_flops)


def adamw_step(work: GroupWork, state: Mapping, ensure_state: EnsureState) -> None:
    g = work.group
    for p in work.containers():  # one count per container, however many slots it holds
        ensure_state(g, p)["step"] += 1
    grads = list(torch._foreach_neg(work.grads)) if g["maximize"] else work.grads
    F.adamw_update_(
        work.local_params, grads, work.local_state(state, "exp_avg"), work.local_state(state, "exp_avg_sq"),
        [int(state[p]["step"].item()) for p in work.params], lr=float(g["lr"]), betas=g["adamw_betas"],
        eps=float(g["adamw_eps"]), weight_decay=float(g["weight_decay"]),
    )


def _active_slices(matrix: list[GroupWork], stats: Statistics):
    """Per work: the flat offset and the positions of the matrices that are active this step."""
    k = 0
    for work in matrix:
        n = len(work.params)
        yield k, [j for j in range(n) if stats.active[k + j]]
        k += n


def update_momenta(matrix: list[GroupWork], pre: Preconditioned, stats: Statistics,
                   state: Mapping) -> list[Tensor | None]:
    """M <- beta M + (1 - beta) clip(c) for active matrices; returns local M (None: inactive)."""
    momenta: list[Tensor | None] = [None] * len(stats.active)
    for work, cs, (k, sel) in zip(matrix, pre.cs, _active_slices(matrix, stats), strict=True):
        all_exp_avgs = work.local_state(state, "exp_avg")
        exp_avgs = [all_exp_avgs[j] for j in sel]
        F.update_momentum_(exp_avgs, [cs[j] for j in sel], [stats.factors[k + j] for j in sel],
                           momentum=float(work.group["momentum"]))
        for j, m in zip(sel, exp_avgs, strict=True):
            momenta[k + j] = m
    return momenta


def orthogonalize_all(ctx: ShardingContext, matrix: list[GroupWork], momenta: list[Tensor | None],
                      timer: PhaseTimer) -> list[Tensor | None]:
    """NS of every active matrix, as a tensor shaped like this rank's local shard."""
    entries = [(w, j) for w in matrix for j in range(len(w.params))]
    config_of = {id(w): cfg for w, cfg in zip(matrix, _work_configs(matrix), strict=True)}
    out: list[Tensor | None] = [None] * len(entries)
    local = [k for k, (w, j) in enumerate(entries) if momenta[k] is not None
             and not ctx.is_sharded_matrix(w.params[j], w.indices[j][1])]
    with timer.phase("newton_schulz"):
        # A slot cut out of a flat container is a 1-D view: give NS its logical shape.
        done = orthogonalize([momenta[k].view(entries[k][0].slots[entries[k][1]].shape) for k in local],
                             [config_of[id(entries[k][0])] for k in local])
    for k, o in zip(local, done, strict=True):
        out[k] = o
    if ctx.engine is not None:
        n = len(ctx.engine.layouts)
        inputs: list[Tensor | None] = [None] * n
        configs: list[NSConfig | None] = [None] * n
        where = {}
        for k, (w, j) in enumerate(entries):
            e = ctx.engine_index.get((id(w.params[j]), w.indices[j][1]))
            if e is not None and momenta[k] is not None:
                inputs[e], configs[e], where[e] = momenta[k], config_of[id(w)], k
        for e, o in enumerate(ctx.engine.orthogonalize(inputs, configs)):
            if o is not None:
                w, j = entries[where[e]]
                out[where[e]] = o.view(w.local_params[j].shape)
    return out


def apply_updates(matrix: list[GroupWork], pre: Preconditioned, stats: Statistics,
                  orthos: list[Tensor | None], state: Mapping) -> None:
    """W <- W (1 - lr wd) - lr s O on local shards, then set P for the next step."""
    for work, gs, (k, sel) in zip(matrix, pre.grads, _active_slices(matrix, stats), strict=True):
        g = work.group
        F.apply_matrix_update_(
            [work.local_params[j] for j in sel], [orthos[k + j] for j in sel], lr=float(g["lr"]),
            weight_decay=float(g["weight_decay"]),
            scales=[scale_for(work.slots[j].shape, g["flatten"]) for j in sel],
        )
        if g["approx"]:
            # A copy, never an alias of .grad: zero_grad(set_to_none=False) zeroes .grad in place.
            prev = work.local_state(state, "last_grad")
            torch._foreach_copy_([prev[j] for j in sel], [gs[j] for j in sel])
        # Per container, not per slot: a flat ZeRO partition holds many slots but counts one
        # step, and swapping its buffers once per slot would undo an even number of swaps.
        for p in {id(work.params[j]): work.params[j] for j in sel}.values():
            s = state[p]
            s["step"] += 1
            if not g["approx"]:
                s["last_grad"], s["lookahead_grad"] = s["lookahead_grad"], s["last_grad"]
                s["lookahead_ready"] = False
