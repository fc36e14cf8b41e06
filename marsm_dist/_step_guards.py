"""Everything a MARSM step does before its first write: the guards.

A step is refused here, with parameters and state untouched on every rank, when a group value is
invalid or differs between ranks, a look-ahead is missing (exact mode), a shard no longer has the
size its plan was made for, or a gradient (or loaded state) holds NaN/Inf. The statistics the
update needs come from the same pass: :func:`step_statistics` computes the squared norm of
c_t = g + kappa (g - P) of every matrix (summed over shards), which sharded matrices got a gradient
anywhere, the clip factors and a NaN/Inf screen, in one all-reduce and one device-to-host read
(c_t is kept for the momentum update when it fits one chunk). It walks the work ``_step_work``
collected without importing that module: the step's three modules are siblings.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import functional as F
from .options import AGREED_KEYS, ARITY, NUMERIC_KEYS, restore_group_types, validate_group
from .orthogonalize import NSConfig
from .sharding.agreement import GroupValues, disagreement, host_tensor

__all__ = ["UNTOUCHED", "ReducedStatistics", "check_step", "describe_nonfinite", "invalid_value",
           "local_problem", "step_statistics", "warn_no_gradients"]

UNTOUCHED = "parameters and optimizer state were left untouched"


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


def check_step(work: Any, param_groups: list[dict[str, Any]], state: Mapping, timer: Any, *,
               screened_state: bool = False) -> ReducedStatistics:
    """Every check before the first write, and the statistics the update needs. A refusal (an
    invalid or disagreeing group value, a missing look-ahead, a stale shard, on this rank or
    another) is raised on every rank; NaN/Inf comes back as ``finite=False`` for the caller to
    raise or skip. ``screened_state``: also screen the state the step reads (after a load)."""
    stale = work.step_map.stale_part(work.matrix)
    problem = local_problem(param_groups, work.matrix, state) or (
        RuntimeError(f"{stale}; {UNTOUCHED}") if stale is not None else None)
    if problem is not None and work.step_map.distributor.group is None:
        raise problem
    told = None if problem is None else str(problem)
    stats = step_statistics(work, param_groups, state, timer, problem=told, screened_state=screened_state)
    if stats.refusal is None and not stats.finite:  # rare: a float32 overflow, or a NaN/Inf?
        stats = step_statistics(work, param_groups, state, timer, precise=True, screened_state=screened_state)
    if stats.refusal is not None:
        raise problem or ValueError(f"MARSM: {stats.refusal}; {UNTOUCHED}")
    return stats


def invalid_value(param_groups: Sequence[dict[str, Any]]) -> str | None:
    """The first invalid value of any group, in torch.optim's voice (None: all valid). Values in
    device tensors are checked for shape only here; their values after the step's read."""
    for i, group in enumerate(param_groups):
        restore_group_types(group)
        try:
            validate_group(group, f" in param group {i}", read_tensors=False)
        except ValueError as err:
            return str(err)
    return None


def local_problem(param_groups: list[dict[str, Any]], matrix: list[Any], state: Mapping
                  ) -> Exception | None:
    """What this rank refuses before anything is written: an invalid group value, or a missing
    look-ahead (exact mode). Returned, not raised: under a job group every rank must learn of it
    through the step's all-reduce and refuse too, or the others would wait in its collectives."""
    invalid = invalid_value(param_groups)
    if invalid is not None:
        return ValueError(f"MARSM: {invalid}; {UNTOUCHED}")
    for work in matrix:
        if work.group["approx"]:
            continue
        for j, p in enumerate(work.params):
            if not state[p].get("lookahead_ready", False):
                return RuntimeError(
                    "MARSM(approx=False): no look-ahead gradient stored for "
                    f"{work.name(j)} since the last step; call "
                    "store_lookahead_grad() after a backward pass on the next batch at the current "
                    f"weights, before every step(); {UNTOUCHED}")
    return None


def pending_lookaheads(matrix: list[Any], state: Mapping) -> list[Tensor]:
    """Local views of the look-ahead gradients that become P after this step (exact mode)."""
    return [t for w in matrix if not w.group["approx"] for t in w.local_state(state, "lookahead_grad")]


# The state a step reads, per branch: screened for NaN/Inf after a checkpoint was loaded.
_READ_STATE = {True: ("exp_avg", "last_grad"), False: ("exp_avg", "exp_avg_sq")}


def loaded_state(matrix: list[Any], adamw: list[Any], state: Mapping) -> list[tuple[str, Any, list[Tensor]]]:
    """(key, work, local views) of every state tensor this step reads."""
    return [(key, work, work.local_state(state, key))
            for works, is_matrix in ((matrix, True), (adamw, False)) for work in works
            for key in _READ_STATE[is_matrix]]


def describe_nonfinite(work: Any, state: Mapping, stats: ReducedStatistics, screened_state: bool = False
                       ) -> str:
    """Name what made this step's statistics non-finite: a local NaN/Inf gradient or look-ahead,
    loaded optimizer state (``screened_state``), a c_t that overflowed float32, or a shard that
    another rank holds."""
    def named(work: Any) -> list[str]:
        return [work.name(j) for j in range(len(work.params))]

    matrix, adamw = work.matrix, work.adamw
    sq_norms, local_sq_norms = stats.sq_norms, stats.local_sq_norms()
    candidates = []
    for key, w, tensors in loaded_state(matrix, adamw, state) if screened_state else []:
        candidates += [(f"optimizer state {key!r} (from the loaded state dict: damaged?)", n, t)
                       for n, t in zip(named(w), tensors, strict=True)]
    for w in matrix + adamw:
        candidates += [("gradient", n, g) for n, g in zip(named(w), w.grads, strict=True)]
    for w in matrix:
        if not w.group["approx"]:
            looks = w.local_state(state, "lookahead_grad")
            candidates += [("look-ahead gradient", n, t) for n, t in zip(named(w), looks, strict=True)]
    for kind, name, t in candidates:
        if t.numel() and not bool(torch.isfinite(t).all()):
            return f"{kind} of {name} (shape {tuple(t.shape)})"
    names = [n for w in matrix for n in named(w)]
    what = "gradient or loaded optimizer state" if screened_state else "gradient"
    for k in [k for k, x in enumerate(sq_norms) if not math.isfinite(x)]:
        if math.isfinite(local_sq_norms[k]):
            return f"{what} shard of {names[k]} held by another rank"
        return f"c_t of {names[k]} (overflow)"
    return f"{what} of a parameter shard held by another rank"


def _vr_squared_norms(matrix: list[Any], state: Mapping, chunk_numel: int, precise: bool,
                      kept: dict | None, device: torch.device, scratch: Any) -> Tensor:
    """||c_t||^2 of every local entry (one float64 vector on the data's device), computing c_t one
    chunk at a time and dropping it, or keeping it in ``kept`` (keyed by work and entry). One
    vector, not a 0-dim tensor per entry: unbinding was 0.36 s of a 0.9 s step with 2304 experts."""
    out: list[Tensor] = []
    for w, work in enumerate(matrix):
        prev = work.local_state(state, "last_grad")
        for js in F.chunks([g.numel() for g in work.grads], chunk_numel):
            _, cs = work.variance_reduced(prev, js, scratch, after=kept is not None and bool(out))
            out.append(F.squared_norms(cs, precise=precise).to(device))
            if kept is not None:
                kept.update(((w, j), c) for j, c in zip(js, cs, strict=True))
            del cs
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


def _local_statistics(work: Any, state: Mapping, precise: bool, kept: dict | None, device: torch.device,
                      screened_state: bool) -> tuple[Tensor, Tensor]:
    """This rank's ||c_t||^2 per matrix, and its NaN/Inf flag for everything else the step reads."""
    norms = _vr_squared_norms(work.matrix, state, work.chunk_numel, precise, kept, device,
                              work.step_map.scratch)
    screened = [t for _, _, ts in (loaded_state(work.matrix, work.adamw, state) if screened_state else [])
                for t in ts]
    others = [g for w in work.adamw for g in w.grads] + pending_lookaheads(work.matrix, state) + screened
    return norms, F.nonfinite_flag(others, device)


def step_statistics(work: Any, param_groups: list[dict[str, Any]], state: Mapping, timer: Any, *,
                    problem: str | None = None, screened_state: bool = False, precise: bool = False
                    ) -> ReducedStatistics:
    """Reduce the statistics over the job group and read them on the host, once.

    ``precise`` accumulates the norms in float64; the step retries with it only when the fast
    statistics came out non-finite (so a float32 overflow is not mistaken for a NaN gradient).
    ``screened_state``: also screen the state the step reads for NaN/Inf (after a load).
    ``problem``: why this rank refuses the step (an invalid group value, a missing look-ahead);
    it computes nothing and only tells the other ranks, through the same all-reduce.
    """
    step_map, matrix, adamw = work.step_map, work.matrix, work.adamw
    distributor = step_map.distributor
    index = [step_map.matrix_index[(id(p), k)]
             for w in matrix for p, (_, k) in zip(w.params, w.indices, strict=True)]
    has = [h for w in matrix for h in w.has_grad]
    first = next((w.grads[0] for w in matrix + adamw), None)
    device = first.device if first is not None else (step_map.device or torch.device("cpu"))
    shared = [n for n, i in enumerate(index) if distributor.is_shared(i)]
    local = [n for n, i in enumerate(index) if not distributor.is_shared(i)]
    # Values are compared under a job group; on meta the terms are reduced but hold no values.
    grouped = distributor.group is not None
    judge = grouped and device.type != "meta"
    hyper = GroupValues(param_groups, device, grouped, AGREED_KEYS, ARITY, NUMERIC_KEYS)
    # c_t of every matrix fits one chunk: keep it for the momentum update (one pass fewer).
    kept = {} if sum(g.numel() for w in matrix for g in w.grads) <= work.chunk_numel else None
    with timer.phase("elementwise"):
        if problem is None:
            norms, flag = _local_statistics(work, state, precise, kept, device, screened_state)
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
        refusal = _invalid_read(hyper)
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


def _group_refusal(hyper: GroupValues, summed: list[float], distributor) -> str | None:
    """Why every rank must refuse this step: a rank refused it (an invalid value, a missing
    look-ahead: the last summed term counts those ranks), or a value differs between ranks."""
    if summed[-1] > 0:
        return "another rank refused this step (its error says why)"
    return disagreement(hyper, summed[:-1], distributor.world_size)


def _finish_statistics(distributor: Any, matrix: list[Any], index: list[int], sq: list[float],
                       active: list[bool], finite: bool, local_sq_norms: Callable[[], list[float]]
                       ) -> ReducedStatistics:
    factors = F.clip_factors(sq) if finite else []
    clipped = sum(1 for k, f in enumerate(factors) if active[k] and f < 1.0)
    configs: list[NSConfig | None] = [None] * len(distributor.matrices)
    on: list[bool] = [False] * len(distributor.matrices)
    k = 0
    for w in matrix:
        cfg = w.ns_config()
        for _ in w.params:
            configs[index[k]], on[index[k]] = cfg, active[k]
            k += 1
    return ReducedStatistics(sq, local_sq_norms, active, finite, factors, clipped,
                             distributor.ns_flops(on, configs), index, configs)


def _invalid_read(hyper: GroupValues) -> str | None:
    """The first device-held value that is invalid, now that it has been read (None: all valid)."""
    if not hyper.tensors:
        return None
    for gi, values in enumerate(hyper.numbers()):
        try:
            validate_group({**hyper.param_groups[gi], **values}, f" in param group {gi}")
        except ValueError as err:
            return str(err)
    return None


def warn_no_gradients() -> None:
    """The warning for an optimizer none of whose parameters got a gradient (given once)."""
    warnings.warn(
        "MARSM.step(): none of the optimizer's parameters has a gradient. If the model was "
        "wrapped or sharded after the optimizer was built (fully_shard, DDP, accelerate's "
        "prepare replace the parameters), the optimizer holds the old tensors: build it from "
        "the wrapped model's parameters.", stacklevel=4)
