"""Phase 1 of a MARSM step: the statistics, in one all-reduce and one device-to-host read.

:func:`step_statistics` computes the squared norm of c_t = g + kappa (g - P) of every matrix
(summed over shards), which sharded matrices got a gradient anywhere, the clip factors, and a
NaN/Inf screen. When this rank's matrices fit in one chunk it keeps c_t for the momentum update
(``ReducedStatistics.kept``); otherwise c_t is computed chunk by chunk and dropped. The later
phases are in ``_step.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from ._param_map import ParamMap
from ._step_checks import HyperValues, disagreement, host_tensor, on_device
from ._step_inputs import GroupWork, loaded_state, nonfinite_flag, pending_lookaheads
from ._timing import PhaseTimer
from ._validation import check_ns_form
from .orthogonalize import NSConfig
from .sharding.plan import plan_buckets


@dataclass
class ReducedStatistics:
    """The reduced step statistics, one entry per matrix in work order (host values)."""

    sq_norms: list[float]
    local_sq_norms: Callable[[], list[float]]  # this rank's own part, read only to explain an error
    active: list[bool]
    finite: bool
    factors: list[float]
    clipped: int
    ns_flops: int  # Newton-Schulz FLOPs this rank runs this step
    matrix_ids: list[int]  # the distributor's index of each entry
    configs: list[NSConfig | None]  # NS config per distributor index (None: not in this step)
    refusal: str | None = None  # why every rank refuses this step (a group value), if it does
    kept: dict[tuple[int, int], Tensor] | None = None  # c_t per (work, entry) when it fit one chunk
    numbers: dict[int, dict[str, Any]] | None = None  # per group (by id): the numbers the update reads

    def values(self, group: dict[str, Any]) -> dict[str, Any]:
        """``group``'s numbers for this step (``lr``, ``weight_decay``, ``momentum``, ``gamma``,
        ``adamw_eps``, ``adamw_betas``), device tensors already read."""
        assert self.numbers is not None
        return self.numbers[id(group)]


def chunks(numels: list[int], limit: int) -> Iterator[list[int]]:
    """Positions of consecutive tensors, at most ``limit`` elements a chunk (a larger one alone)."""
    for bucket in plan_buckets(numels, [0] * len(numels), 1, limit):
        yield list(bucket)


def grads_of(work: GroupWork, js: list[int]) -> list[Tensor]:
    """Local gradients of entries ``js``, negated for ``maximize`` (a copy of this chunk only)."""
    gs = [work.grads[j] for j in js]
    return list(torch._foreach_neg(gs)) if work.group["maximize"] else gs


def _kappa(group: dict[str, Any]) -> float | Tensor:
    """kappa as a number, or as a device tensor when momentum or gamma is one (reading it here
    would be a device-to-host read before the step's one)."""
    momentum, gamma = group["momentum"], group["gamma"]
    if on_device(momentum) or on_device(gamma):
        return gamma * momentum / (1.0 - momentum)
    return F.marsm_kappa(float(momentum), float(gamma))


def variance_reduced(work: GroupWork, prev: list[Tensor],
                      js: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """The (sign-adjusted) gradients of entries ``js`` and their c_t = g + kappa (g - P), new
    tensors of this chunk only. Both phases that need c_t call this, so they compute it alike."""
    gs = grads_of(work, js)
    return gs, F.variance_reduced_grads(gs, [prev[j] for j in js], kappa=_kappa(work.group))


def _vr_squared_norms(matrix: list[GroupWork], state: Mapping, chunk_numel: int,
                      precise: bool, kept: dict[tuple[int, int], Tensor] | None,
                      device: torch.device) -> Tensor:
    """||c_t||^2 of every local entry (one float64 vector on the data's device), computing c_t one
    chunk at a time and dropping it, or keeping it in ``kept`` (keyed by work and entry). One
    vector, not a 0-dim tensor per entry: unbinding was 0.36 s of a 0.9 s step with 2304 experts."""
    out: list[Tensor] = []
    for w, work in enumerate(matrix):
        prev = work.local_state(state, "last_grad")
        for js in chunks([g.numel() for g in work.grads], chunk_numel):
            _, cs = variance_reduced(work, prev, js)
            out.append(F.squared_norms(cs, precise=precise).to(device))
            if kept is not None:
                kept.update(((w, j), c) for j, c in zip(js, cs, strict=True))
            del cs
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


def _config(group: dict[str, Any]) -> NSConfig:
    # "ns_form" is validated when a group is added; this catches a group edited afterwards (or
    # loaded from a state dict) in the statistics phase, before anything is written.
    form = group.get("ns_form", "auto")
    check_ns_form(form)
    return NSConfig(group["ns_steps"], group["ns_dtype"], group["ns_coefficients"], group["flatten"], form)


def _work_configs(matrix: list[GroupWork]) -> list[NSConfig]:
    """One NS config per work (group), built once per step instead of once per matrix."""
    return [_config(w.group) for w in matrix]


def step_statistics(pm: ParamMap, matrix: list[GroupWork], adamw: list[GroupWork],
                    state: Mapping, chunk_numel: int, timer: PhaseTimer, *, precise: bool = False,
                    param_groups: list[dict[str, Any]], problem: str | None = None,
                    screened_state: bool = False) -> ReducedStatistics:
    """Reduce the statistics over the job group and read them on the host, once.

    ``precise`` accumulates the norms in float64; the step retries with it only when the fast
    statistics came out non-finite (so a float32 overflow is not mistaken for a NaN gradient).
    ``screened_state``: also screen the state the step reads for NaN/Inf (after a load).
    ``problem``: why this rank refuses the step (an invalid group value, a missing look-ahead);
    it computes nothing and only tells the other ranks, through the same all-reduce.
    """
    distributor = pm.distributor
    index = [pm.matrix_index[(id(p), k)]
             for w in matrix for p, (_, k) in zip(w.params, w.indices, strict=True)]
    has = [h for w in matrix for h in w.has_grad]
    first = next((w.grads[0] for w in matrix + adamw), None)
    device = first.device if first is not None else (pm.device or torch.device("cpu"))
    shared = [n for n, i in enumerate(index) if distributor.is_shared(i)]
    local = [n for n, i in enumerate(index) if not distributor.is_shared(i)]
    # Values are compared under a job group; on meta the terms are reduced but hold no values.
    grouped = distributor.group is not None
    judge = grouped and device.type != "meta"
    hyper = HyperValues(param_groups, device, agree=grouped)
    # c_t of every matrix fits one chunk: keep it for the momentum update (one pass fewer).
    kept = {} if sum(g.numel() for w in matrix for g in w.grads) <= chunk_numel else None
    with timer.phase("elementwise"):
        if problem is None:
            norms = _vr_squared_norms(matrix, state, chunk_numel, precise, kept, device)
            screened = [t for _, _, ts in (loaded_state(matrix, adamw, state) if screened_state else [])
                        for t in ts]
            flag = nonfinite_flag([g for w in adamw for g in w.grads] + pending_lookaheads(matrix, state)
                                  + screened, device)
        else:  # the values are unusable (momentum = 1 divides by zero): only signal the others
            norms = torch.zeros(len(index), dtype=torch.float64, device=device)
            flag = torch.zeros(1, dtype=torch.float64, device=device)
        local_sq = norms[host_tensor(local, device, torch.int64)] if local else norms[:0]
        flag = flag + local_sq.sum() * 0.0  # a NaN/Inf among own matrices must stop every rank too
        # A shared matrix's norm is the sum over one copy's parts; other copies add theirs times
        # zero (which keeps a NaN of theirs visible). Which shared matrices have a gradient here.
        here = host_tensor([1.0 if distributor.counts_here(index[k]) else 0.0 for k in shared], device)
        shared_sq = norms[host_tensor(shared, device, torch.int64)] * here if shared else norms[:0]
        counts = host_tensor([1.0 if has[k] else 0.0 for k in shared], device)
        checks = (torch.cat([hyper.terms(), host_tensor([float(problem is not None)], device)]) if grouped
                  else torch.zeros(0, dtype=torch.float64, device=device))
    with timer.phase("communication"):
        vec = distributor.sum_over_ranks(torch.cat([shared_sq, counts, flag, checks]))
        # The step's one device-to-host read: the sums, this rank's own norms, hyperparameters
        # held in device tensors.
        values = torch.cat([vec.to(device), local_sq, hyper.values_to_read()]).tolist()
    n, m = len(shared), checks.numel()
    hyper.set_read(values[len(values) - len(hyper.tensors):])
    refusal = problem
    if refusal is None and judge:
        refusal = _group_refusal(hyper, values[2 * n + 1:2 * n + 1 + m], distributor)
    if refusal is None and device.type != "meta":  # (meta: the read values are stand-ins)
        refusal = hyper.invalid_read()
    sq, active = [0.0] * len(index), [True] * len(index)
    for i, k in enumerate(shared):
        sq[k], active[k] = values[i], values[n + i] > 0
    for i, k in enumerate(local):
        sq[k] = values[2 * n + 1 + m + i]
    finite = all(math.isfinite(x) for x in sq) and math.isfinite(values[2 * n])
    if refusal is not None:
        return ReducedStatistics(sq, lambda: [], active, finite, [], 0, 0, index, [], refusal)
    stats = _finish_statistics(distributor, matrix, index, sq, active, finite,
                               lambda: norms.tolist())
    stats.kept = kept
    stats.numbers = {id(g): v for g, v in zip(param_groups, hyper.numbers(), strict=True)}
    return stats


def _group_refusal(hyper: HyperValues, summed: list[float], distributor) -> str | None:
    """Why every rank must refuse this step: a rank refused it (an invalid value, a missing
    look-ahead: the last summed term counts those ranks), or a value differs between ranks."""
    if summed[-1] > 0:
        return "another rank refused this step (its error says why)"
    return disagreement(hyper, summed[:-1], distributor.world_size)


def _finish_statistics(distributor, matrix: list[GroupWork], index: list[int], sq: list[float],
                       active: list[bool], finite: bool, local_sq_norms: Callable[[], list[float]]
                       ) -> ReducedStatistics:
    factors = F.clip_factors(sq) if finite else []
    clipped = sum(1 for k, f in enumerate(factors) if active[k] and f < 1.0)
    configs: list[NSConfig | None] = [None] * len(distributor.matrices)
    on: list[bool] = [False] * len(distributor.matrices)
    k = 0
    for work, cfg in zip(matrix, _work_configs(matrix), strict=True):
        for _ in work.params:
            configs[index[k]], on[index[k]] = cfg, active[k]
            k += 1
    return ReducedStatistics(sq, local_sq_norms, active, finite, factors, clipped,
                      distributor.ns_flops(on, configs), index, configs)
