"""The owner plan: which rank orthogonalizes each matrix, and which matrices share an exchange.

A round (bucket) is a rendezvous: every rank gathers, the owners orthogonalize, every rank gets its
results back. So a step's Newton-Schulz time is the sum over rounds of the busiest owner in that
round (the *critical path*), not the busiest rank's total. Rounds planned in index order with
owners chosen for the totals alone were measured at 2.25x the balanced total for Llama-3-8B shapes
at W=8 (37 rounds; round-robin 1.72x) while the totals balanced to 1.000. The ``balanced`` policy
therefore chooses owners and rounds together (:func:`plan_rounds`): each round is a level of a
set height, and every owner is filled up to that height.

Pure functions of the matrices' shapes and the world size, so every rank computes the same plan
with no communication (the engine still compares a digest across ranks once, to catch ranks that
were handed different parameters).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

from ..functional import chunks
from ..newton_schulz import newton_schulz_flops
from .pinned_plan import plan_levels, plan_owners_within
from .teams import member_cost, plan_teams

__all__ = ["OWNER_POLICIES", "ExchangePlan", "level_pack", "lower_bound", "make_plan",
           "plan_buckets", "plan_owners", "plan_owners_within", "plan_rounds"]

OWNER_POLICIES = ("round_robin", "balanced")


@dataclass(frozen=True)
class ExchangePlan:
    """Owners and exchange rounds for a list of matrices.

    Attributes:
        world_size: ranks in the process group.
        owners: ``owners[i]`` is the rank that orthogonalizes matrix ``i``.
        buckets: matrix indices per exchange round (one gather and one scatter each).
        ns_flops: predicted Newton-Schulz FLOPs per rank for one step.
        costs: predicted Newton-Schulz FLOPs per matrix.
        teams: per matrix, the ranks that split its Newton-Schulz (the owner first), or ``()``
            when its owner runs it alone (:mod:`marsm_dist.sharding.teams`).
        member_costs: per matrix, the FLOPs each team member runs (its cost when alone).
    """

    world_size: int
    owners: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    ns_flops: tuple[int, ...]
    costs: tuple[int, ...] = ()
    teams: tuple[tuple[int, ...], ...] = ()
    member_costs: tuple[int, ...] = ()

    def ranks_of(self, i: int) -> tuple[int, ...]:
        """The ranks that run matrix ``i``'s Newton-Schulz."""
        return (self.teams[i] if self.teams else ()) or (self.owners[i],)

    def round_loads(self) -> list[list[int]]:
        """Per round, the Newton-Schulz FLOPs of each rank."""
        ranks = [self.ranks_of(i) for i in range(len(self.owners))]
        return _round_loads(self.buckets, ranks, self.member_costs or self.costs, self.world_size)

    @property
    def critical_path_flops(self) -> int:
        """Sum over rounds of the busiest owner's FLOPs: what a step waits for when every round is
        a rendezvous."""
        return sum(max(load) for load in self.round_loads())

    @property
    def critical_path_ratio(self) -> float:
        """:attr:`critical_path_flops` / the busiest rank's total (1.0: rounds cost nothing)."""
        busiest = max(self.ns_flops)
        return self.critical_path_flops / busiest if busiest else 1.0

    @property
    def lower_bound_flops(self) -> int:
        """No assignment of whole matrices to ranks can give the busiest rank less (:func:`lower_bound`)."""
        return lower_bound(list(self.costs), self.world_size)

    @property
    def flops_balance(self) -> float:
        """max / mean of the per-rank Newton-Schulz FLOPs (1.0 is perfect balance)."""
        mean = sum(self.ns_flops) / self.world_size
        return max(self.ns_flops) / mean if mean else 1.0

    def digest(self) -> int:
        """A 62-bit fingerprint of the plan, equal on ranks that computed the same plan."""
        text = repr((self.world_size, self.owners, self.buckets, self.teams)).encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 2


def plan_owners(costs: list[int], world_size: int, policy: str) -> list[int]:
    """``round_robin``: matrix i goes to rank i mod W (the paper's scheme). ``balanced``: the
    costliest matrix first, each to the least-loaded rank (ties: lowest index, lowest rank)."""
    if policy == "round_robin":
        return [i % world_size for i in range(len(costs))]
    if policy != "balanced":
        raise ValueError(f"Invalid owner_policy: {policy!r} (expected one of {OWNER_POLICIES})")
    load, owners = [0] * world_size, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def plan_buckets(numels: list[int], owners: list[int], world_size: int, bucket_numel: int):
    """Rounds for fixed owners: each round takes, from every rank, its next matrices (in index
    order) up to ``bucket_numel`` elements, which bounds the extra memory; a matrix larger than
    the bound goes alone. Taking from every owner at once (rather than cutting the index order
    where the first owner fills up) keeps every owner busy in every round."""
    queues: list[list[int]] = [[] for _ in range(world_size)]
    for i, owner in enumerate(owners):
        queues[owner].append(i)
    # Round k takes every rank's k-th chunk of its own queue.
    per_rank = [[[queue[j] for j in chunk] for chunk in chunks([numels[i] for i in queue], bucket_numel)]
                for queue in queues]
    rounds = max((len(c) for c in per_rank), default=0)
    return [tuple(sorted(i for c in per_rank if k < len(c) for i in c[k])) for k in range(rounds)]



def plan_rounds(costs: list[int], numels: list[int], world_size: int, bucket_numel: int
                ) -> tuple[list[int], list[tuple[int, ...]]]:
    """Owners and rounds together, so that no owner waits long on another within a round.

    Level packing (:func:`level_pack`) twice: with each round's height set by its costliest
    matrix (many even rounds: uniform transformer stacks come out exact, and many rounds give the
    pipelined exchange something to overlap), and with the height raised to the lower bound of
    what is left (fewer, fuller rounds: needed where a rank must take two matrices of different
    shapes, e.g. GPT-2 medium at W=64, 1.14x the other way). The plan with the shorter critical
    path wins; on a tie, the one with more rounds.

    Returns ``(owners, rounds)``; rounds list matrix indices in ascending order.
    """
    plans = [level_pack(costs, numels, world_size, bucket_numel, fill_to_bound=f) for f in (False, True)]
    return min(plans, key=lambda plan: (_critical_path(costs, *plan, world_size), -len(plan[1])))


def level_pack(costs: list[int], numels: list[int], world_size: int, bucket_numel: int, *,
               fill_to_bound: bool = False) -> tuple[list[int], list[tuple[int, ...]]]:
    """One level-packing pass: the costliest matrix left opens a round; its height is that
    matrix's cost (or, ``fill_to_bound``, the lower bound of the matrices left, if higher). The
    remaining matrices, costliest first, each go to the least-loaded rank of the round that still
    has room for it below the height (and within ``bucket_numel`` elements, unless the rank has
    nothing yet in the round); those that fit nowhere wait for a later round. Each round's loads
    are then dealt to the ranks with the least total so far, heaviest first, which keeps the
    totals balanced as well."""
    left = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    owners, rounds, total = [0] * len(costs), [], [0] * world_size
    while left:
        height = costs[left[0]]
        if fill_to_bound:
            height = max(height, lower_bound([costs[i] for i in left], world_size))
        load, held = [0] * world_size, [0] * world_size
        members: list[list[int]] = [[] for _ in range(world_size)]
        heap = [(0, b) for b in range(world_size)]
        waiting = []
        for pos, i in enumerate(left):
            if heap[0][0] + costs[left[-1]] > height:  # nothing left fits anywhere
                waiting.extend(left[pos:])
                break
            popped, placed = [], False
            while heap and heap[0][0] + costs[i] <= height:
                _, b = heapq.heappop(heap)
                popped.append(b)
                if not members[b] or held[b] + numels[i] <= bucket_numel:
                    members[b].append(i)
                    load[b] += costs[i]
                    held[b] += numels[i]
                    placed = True
                    break
            for b in popped:
                heapq.heappush(heap, (load[b], b))
            if not placed:
                waiting.append(i)
        # Deal the round's bins to ranks: the heaviest bin to the rank with the least so far.
        bins = sorted((b for b in range(world_size) if members[b]), key=lambda b: (-load[b], b))
        ranks = sorted(range(world_size), key=lambda r: (total[r], r))
        for b, r in zip(bins, ranks, strict=False):
            for i in members[b]:
                owners[i] = r
            total[r] += load[b]
        rounds.append(tuple(sorted(i for b in bins for i in members[b])))
        left = waiting
    return owners, rounds


def lower_bound(costs: list[int], world_size: int) -> int:
    """No assignment of these whole matrices to ``world_size`` ranks gives the busiest rank less:
    the mean (rounded up), the largest matrix, and the W-th plus the (W+1)-th largest (W+1
    matrices on W ranks: one rank takes two)."""
    ranked = sorted(costs, reverse=True)
    pair = ranked[world_size - 1] + ranked[world_size] if len(ranked) > world_size else 0
    return max(-(-sum(ranked) // world_size), ranked[0] if ranked else 0, pair)


def _round_loads(rounds, ranks: list[tuple[int, ...]], costs, world_size: int) -> list[list[int]]:
    """Per round, each rank's FLOPs: matrix i adds ``costs[i]`` to every rank in ``ranks[i]``."""
    loads = []
    for bucket in rounds:
        load = [0] * world_size
        for i in bucket:
            for r in ranks[i]:
                load[r] += costs[i]
        loads.append(load)
    return loads


def _critical_path(costs: list[int], owners: list[int], rounds: list[tuple[int, ...]], world_size: int
                   ) -> int:
    return sum(max(load) for load in _round_loads(rounds, [(o,) for o in owners], costs, world_size))


def make_plan(
    shapes: list[tuple[int, ...]],
    world_size: int,
    policy: str = "balanced",
    bucket_numel: int = 1 << 26,
    ns_steps: int = 5,
    max_team: int = 1,
    candidates: list[tuple[int, ...] | None] | None = None,
) -> ExchangePlan:
    """The plan for matrices of ``shapes`` over ``world_size`` ranks; with ``max_team`` > 1, ranks
    idle in a round join the busiest owner's team (:func:`~marsm_dist.sharding.teams.plan_teams`).

    ``candidates[i]``: the ranks matrix i's owner must be one of (locality: ranks that already
    hold it, see ``MatrixLayout.preferred_owners``), or None for any rank. When any matrix has
    candidates, owners come from :func:`plan_owners_within` and rounds from :func:`plan_levels`
    (``balanced``) or :func:`plan_buckets` (``round_robin``)."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"Invalid bucket size: {bucket_numel} elements")
    if policy not in OWNER_POLICIES:
        raise ValueError(f"Invalid owner_policy: {policy!r} (expected one of {OWNER_POLICIES})")
    costs = [newton_schulz_flops(s if len(s) >= 2 else (1, *s), ns_steps) for s in shapes]
    numels = [math.prod(s) for s in shapes]
    if candidates is not None and len(candidates) != len(shapes):
        raise ValueError(f"{len(candidates)} candidate sets for {len(shapes)} matrices")
    pinned = candidates is not None and any(c is not None for c in candidates)
    if pinned:
        max_team = 1  # teams relabel owners, which would move a matrix off the ranks that hold it
        owners = plan_owners_within(costs, world_size, policy, candidates, lower_bound(costs, world_size))
        buckets = (plan_levels(costs, numels, owners, world_size, bucket_numel) if policy == "balanced"
                   else plan_buckets(numels, owners, world_size, bucket_numel))
    elif policy == "balanced":
        owners, buckets = plan_rounds(costs, numels, world_size, bucket_numel)
    else:
        owners = plan_owners(costs, world_size, policy)
        buckets = plan_buckets(numels, owners, world_size, bucket_numel)
    owners, teams = plan_teams(shapes, owners, buckets, world_size, max_team, ns_steps)
    member = [member_cost(s, len(t), ns_steps) if t else c
              for s, t, c in zip(shapes, teams, costs, strict=True)]
    flops = [0] * world_size
    for i, owner in enumerate(owners):
        for r in teams[i] or (owner,):
            flops[r] += member[i]
    return ExchangePlan(world_size, tuple(owners), tuple(buckets), tuple(flops), tuple(costs),
                        tuple(teams) if any(teams) else (), tuple(member))
