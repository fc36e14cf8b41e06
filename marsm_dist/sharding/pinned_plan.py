"""The owner plan when some matrices must be owned by one of a few ranks (locality: the ranks that
already hold them, e.g. an expert on its expert-parallel ranks; see ``MatrixLayout.preferred_owners``).

Two measured traps, from ``benchmarks/scale_model.py``'s MoE rows (Qwen3-30B-A3B-like and
DeepSeek-V3-like shapes, EP 8-64, W 64-1024):

- Placing the pinned matrices first filled every rank to its group's mean before any free (dense)
  matrix was placed; the dense ones then stacked on full ranks (1.70x the bound at W=1024). One
  largest-first pass over all matrices lets the small pinned experts fill in around the big dense
  ones.
- Rounds cut from each owner's queue in index order put one owner's 38 ms MLP beside another's
  4.6 ms of experts in one round (a round waits for its busiest owner: 2.0x the bound at W=64 with
  the totals balanced to 1.015). Rounds aligned by cost fix that.
"""

from __future__ import annotations

__all__ = ["plan_levels", "plan_owners_within"]

_PINNED_LIMIT = 1.25  # a plan that keeps every matrix on its candidates, if its busiest rank is within this
_SLACK = 1.02  # else: how far above the bound a candidate may be filled before a matrix moves off it


def plan_owners_within(costs: list[int], world_size: int, policy: str,
                       candidates: list[tuple[int, ...] | None], bound: int) -> list[int]:
    """Owners when matrix i must go to one of ``candidates[i]`` (None: any rank). ``policy`` is
    ``make_plan``'s (checked there); ``bound``: ``plan.lower_bound`` of ``costs``.

    ``balanced``: costliest first (ties: fewer candidates first), each to its least-loaded
    candidate. If that leaves the busiest rank above 1.25x the job's lower bound, locality yields:
    a matrix moves off its candidates where they would rise above the bound (+2%) and another rank
    would not. ZeRO-2 partitions at W=64 (Llama-3-8B: every matrix inside one or two ranks'
    partitions) pinned two large matrices on some ranks, 1.39x the bound, for a few bytes saved;
    now 1.018x. Expert-parallel experts (many, small, evenly spread) stay on their holders.
    ``round_robin``: matrix i to rank i mod W, or, with candidates, to the next of its
    candidates in turn (per candidate set).
    """
    if policy == "round_robin":
        turn: dict[tuple[int, ...], int] = {}
        owners = []
        for i, c in enumerate(candidates):
            if c is None:
                owners.append(i % world_size)
            else:
                k = turn[c] = turn.get(c, -1) + 1
                owners.append(c[k % len(c)])
        return owners
    everyone = tuple(range(world_size))
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], len(candidates[i] or everyone), i))
    owners, busiest = _greedy(costs, candidates, order, everyone, None)
    if busiest > _PINNED_LIMIT * bound:
        # Locality yields to balance where it costs too much: a matrix leaves its candidates when
        # the least-loaded of them would rise above the bound (+2%) and another rank would not.
        owners, _ = _greedy(costs, candidates, order, everyone, _SLACK * bound)
    return owners


def _greedy(costs: list[int], candidates: list[tuple[int, ...] | None], order: list[int],
            everyone: tuple[int, ...], ceiling: float | None) -> tuple[list[int], int]:
    load, owners = [0] * len(everyone), [0] * len(costs)
    for i in order:
        rank = min(candidates[i] or everyone, key=lambda r: (load[r], r))
        if ceiling is not None and load[rank] + costs[i] > ceiling:
            anywhere = min(everyone, key=lambda r: (load[r], r))
            if load[anywhere] + costs[i] <= ceiling:
                rank = anywhere
        owners[i] = rank
        load[rank] += costs[i]
    return owners, max(load, default=0)


def plan_levels(costs: list[int], numels: list[int], owners: list[int], world_size: int,
                bucket_numel: int) -> list[tuple[int, ...]]:
    """Rounds for fixed owners, aligned by cost. Each owner's matrices go costliest first; a round's
    height is the costliest matrix left anywhere or, if higher, the busiest owner's remaining cost
    spread over the rounds the owner with the most elements left still needs at ``bucket_numel``;
    each owner takes its next matrices up to the height (at least one, within ``bucket_numel``).
    Rounds list matrix indices in ascending order."""
    queues: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        queues[owners[i]].append(i)
    left_cost, left_numel = [0] * world_size, [0] * world_size
    for i, o in enumerate(owners):
        left_cost[o] += costs[i]
        left_numel[o] += numels[i]
    heads, rounds = [0] * world_size, []
    while True:
        live = [r for r in range(world_size) if heads[r] < len(queues[r])]
        if not live:
            return rounds
        need = max(-(-left_numel[r] // bucket_numel) for r in live)
        height = max(max(costs[queues[r][heads[r]]] for r in live), max(left_cost[r] for r in live) / need)
        current = []
        for r in live:
            load = held = 0
            while heads[r] < len(queues[r]):
                i = queues[r][heads[r]]
                if load and (load + costs[i] > height or held + numels[i] > bucket_numel):
                    break
                current.append(i)
                load, held = load + costs[i], held + numels[i]
                left_cost[r] -= costs[i]
                left_numel[r] -= numels[i]
                heads[r] += 1
        rounds.append(tuple(sorted(current)))
