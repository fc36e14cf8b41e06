"""The phases of one MARSM step that write, over the work ``_step_work`` collected, on local shards.

1. ``_step_guards.step_statistics`` (before this module): the squared norm of
   c_t = g + kappa (g - P) of every matrix (summed over shards), which sharded matrices got a
   gradient anywhere, and a NaN/Inf screen: one all-reduce and one device-to-host read, the step's only one.
2. :func:`adamw_step`, :func:`update_momenta`: elementwise updates of the state.
3. :func:`orthogonalize_and_apply`: Newton-Schulz bucket by bucket through the distributor
   (which knows where each matrix's NS runs); each bucket's result is applied (decay + scaled
   orthogonal step) as soon as it exists, so no result outlives its bucket.
4. :func:`finish_matrices`: step counters, and the exact mode's P swap.

Memory: c_t is never held for more than ``chunk_numel`` elements. When this rank's matrices fit
in one chunk, phase 1 keeps c_t for phase 2; otherwise phase 1 computes it chunk by chunk for
its norm and drops it, and phase 2 computes it again the same way, which costs one extra
elementwise pass and keeps the step's extra memory set by the bucket size rather than by the
model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .orthogonalize import scale_for

# The work and statistics come from ``_step_work`` and ``_step_guards``; the step's three modules
# are siblings and do not import each other.
GroupWork = Any
ReducedStatistics = Any


def step_counts(counters: list[Tensor]) -> list[float]:
    """The values of step counters (CPU tensors) in one call, not one ``.item()`` each."""
    return torch.stack(counters).tolist() if counters else []


def _pieces(columns: list[list[Tensor]], limit: int) -> tuple[list[list[Tensor]], list[int]]:
    """Cut aligned rows of tensors (one row: a parameter, its grad, its state) into flat pieces of
    at most ``limit`` elements, for elementwise math whose temporaries must stay bounded (an
    embedding can be far larger than a bucket). Returns the piece columns and each piece's row."""
    out: list[list[Tensor]] = [[] for _ in columns]
    rows: list[int] = []
    for j, row in enumerate(zip(*columns, strict=True)):
        if row[0].numel() > limit and all(t.is_contiguous() for t in row):
            parts = [t.view(-1).split(limit) for t in row]
        else:
            parts = [[t] for t in row]
        for column, ps in zip(out, parts, strict=True):
            column.extend(ps)
        rows += [j] * len(parts[0])
    return out, rows


def adamw_step(work: GroupWork, state: Mapping, chunk_numel: int, values: Mapping[str, Any],
               scratch: Any = None, fused: bool = False) -> None:
    """The AdamW branch of one group. ``values``: its numbers this step (``ReducedStatistics.values``);
    ``fused``: through torch's fused AdamW kernel where it takes the tensors."""
    g = work.group
    containers = work.containers()  # one count per container, however many slots it holds
    counters = [state[p]["step"] for p in containers]
    torch._foreach_add_(counters, 1.0)
    step_of = {id(p): int(k) for p, k in zip(containers, step_counts(counters), strict=True)}
    moments = [work.local_state(state, "exp_avg"), work.local_state(state, "exp_avg_sq")]
    (params, grads, exp_avgs, exp_avg_sqs), rows = _pieces([work.local_params, work.grads, *moments],
                                                           chunk_numel)
    hyper = {"lr": values["lr"], "betas": values["adamw_betas"], "eps": values["adamw_eps"],
             "weight_decay": values["weight_decay"]}
    if fused and F.fused_adamw_serves([*params, *grads, *exp_avgs, *exp_avg_sqs]):
        F.fused_adamw_update_(params, grads, exp_avgs, exp_avg_sqs,
                              [step_of[id(work.params[r])] for r in rows], maximize=g["maximize"], **hyper)
        return
    for js in F.chunks([t.numel() for t in params], chunk_numel):  # bounds sqrt(v)'s temporaries
        gs = [grads[j] for j in js]
        F.adamw_update_(
            [params[j] for j in js], list(torch._foreach_neg(gs)) if g["maximize"] else gs,
            [exp_avgs[j] for j in js], [exp_avg_sqs[j] for j in js],
            [step_of[id(work.params[rows[j]])] for j in js], scratch=scratch, **hyper,
        )


def _active_slices(matrix: list[GroupWork], stats: ReducedStatistics):
    """Per work: the flat offset and the positions of the matrices that are active this step."""
    k = 0
    for work in matrix:
        n = len(work.params)
        yield k, [j for j in range(n) if stats.active[k + j]]
        k += n


def update_momenta(matrix: list[GroupWork], stats: ReducedStatistics, state: Mapping,
                   chunk_numel: int, scratch: Any = None) -> None:
    """M <- beta M + (1 - beta) clip(c) for active matrices (c_t recomputed chunk by chunk); in
    approximate mode P <- g right after, as c_t was its last use this step."""
    kept = stats.kept or {}
    stats.kept = None
    for w, (work, (k, sel)) in enumerate(zip(matrix, _active_slices(matrix, stats), strict=True)):
        g = work.group
        prev, exp_avgs = work.local_state(state, "last_grad"), work.local_state(state, "exp_avg")
        for part in F.chunks([work.grads[j].numel() for j in sel], chunk_numel):
            js = [sel[i] for i in part]
            if all((w, j) in kept for j in js):
                gs, cs = work.signed_grads(js), [kept.pop((w, j)) for j in js]
            else:
                gs, cs = work.variance_reduced(prev, js, scratch)
            F.update_momentum_([exp_avgs[j] for j in js], cs, [stats.factors[k + j] for j in js],
                               momentum=stats.values(g)["momentum"])
            if g["approx"]:
                # A copy, never an alias of .grad: zero_grad(set_to_none=False) zeroes .grad in place.
                torch._foreach_copy_([prev[j] for j in js], gs)
            del cs, gs
    kept.clear()


def update_scales(matrix: list[GroupWork], stats: ReducedStatistics) -> dict[int, float]:
    """s of every active matrix by its group's ``lr_scale`` (by distributor index), worked out
    before the step writes anything: a callable rule that fails leaves the step untouched."""
    scales: dict[int, float] = {}
    for work, (k, sel) in zip(matrix, _active_slices(matrix, stats), strict=True):
        g = work.group
        for j in sel:
            scales[stats.matrix_ids[k + j]] = scale_for(work.slots[j].shape, g["flatten"],
                                                        g.get("lr_scale", "mars_m"))
    return scales


def orthogonalize_and_apply(work: Any, stats: ReducedStatistics, state: Mapping, timer: Any,
                            scales: Mapping[int, float]) -> None:
    """NS of every active matrix through the distributor; W <- W (1 - lr wd) - lr s O as each
    bucket's results arrive (``scales``: s by distributor index, see :func:`update_scales`)."""
    distributor, matrix = work.step_map.distributor, work.matrix
    momenta: list[Tensor | None] = [None] * len(distributor.matrices)
    where: dict[int, tuple[GroupWork, int]] = {}
    k = 0
    for entry in matrix:
        exp_avgs = entry.local_state(state, "exp_avg")
        for j in range(len(entry.params)):
            if stats.active[k]:
                i = stats.matrix_ids[k]
                momenta[i], where[i] = exp_avgs[j], (entry, j)
            k += 1
    for i, o in distributor.results(momenta, stats.configs):
        w, j = where[i]
        values = stats.values(w.group)
        with timer.phase("apply"):
            F.apply_matrix_update_([w.local_params[j]], [o], lr=values["lr"],
                                   weight_decay=values["weight_decay"], scales=[scales[i]],
                                   scratch=work.step_map.scratch)
        del o


def finish_matrices(matrix: list[GroupWork], stats: ReducedStatistics, state: Mapping) -> None:
    """Count the step, and in exact mode make the stored look-ahead the next step's P."""
    for work, (_, sel) in zip(matrix, _active_slices(matrix, stats), strict=True):
        # Per container, not per slot: a flat ZeRO partition holds many slots but counts one
        # step, and swapping its buffers once per slot would undo an even number of swaps.
        containers = list({id(work.params[j]): work.params[j] for j in sel}.values())
        if not containers:  # a group none of whose matrices got a gradient anywhere: nothing to count
            continue
        torch._foreach_add_([state[p]["step"] for p in containers], 1.0)
        if not work.group["approx"]:
            for p in containers:
                s = state[p]
                s["last_grad"], s["lookahead_grad"] = s["lookahead_grad"], s["last_grad"]
                s["lookahead_ready"] = False


def apply_step(work: Any, stats: ReducedStatistics, state: Mapping, timer: Any, fused: bool = False) -> None:
    """Every write of the step, in order: the momenta and the AdamW branch (elementwise), then
    Newton-Schulz and the matrix update bucket by bucket, then the counters and P. The momenta go
    first: they consume the c_t kept in the scratch memory, which the AdamW branch then reuses."""
    scales = update_scales(work.matrix, stats)
    with timer.phase("elementwise"):
        update_momenta(work.matrix, stats, state, work.chunk_numel, work.step_map.scratch)
        for entry in work.adamw:
            adamw_step(entry, state, work.chunk_numel, stats.values(entry.group), work.step_map.scratch,
                       fused)
    orthogonalize_and_apply(work, stats, state, timer, scales)
    finish_matrices(work.matrix, stats, state)
