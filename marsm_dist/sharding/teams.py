"""Teams: ranks that would sit idle in a round help the busiest owner with its largest matrix.

Whole-matrix ownership caps the balance where ranks outnumber matrices: Llama-3-70B at W=1024
waits on one 28672 x 8192 matrix per owner while 464 ranks own nothing. A team splits one
matrix's Newton-Schulz by columns (:mod:`marsm_dist.sharding.split_newton_schulz`): each member
does ``steps * (2 m^2 n / k + m^3)`` multiply-adds and the team all-reduces one m x m matrix per
iteration. The m^3 term is not split, so a team helps matrices with n >> m most, and stops helping
where it dominates.

Pure functions of the plan, like the plan itself. Members are taken from the leader's aligned
block of ``max_team`` ranks (consecutive ranks: the same node when ``max_team`` divides the
ranks per node), so the team's traffic stays on the fast links.
"""

from __future__ import annotations

from ..newton_schulz import _plain_macs

__all__ = ["member_cost", "plan_teams"]


def member_cost(shape: tuple[int, ...], k: int, steps: int = 5) -> int:
    """FLOPs (2 per multiply-add) one of ``k`` members runs for a matrix of ``shape``: the plain
    iteration on an m x ceil(n / k) block is its share of the two m^2 n products and the whole
    m^3 one (k = 1: the matrix alone, as ``newton_schulz_flops`` counts it)."""
    m, n = sorted(shape[-2:])
    return 2 * _plain_macs(m, -(-n // k), steps)


def plan_teams(shapes: list[tuple[int, ...]], owners: list[int], buckets: list[tuple[int, ...]],
               world_size: int, max_team: int, steps: int = 5) -> tuple[list[int], list[tuple[int, ...]]]:
    """Owners (relabelled) and, per matrix, its team (leader = owner first), or ``()``.

    Only a plan of one round has ranks to spare for a whole step (more ranks than owners' bins;
    in a plan of many rounds every rank owns something in most rounds). There: while ranks are
    free, the busiest owners (all within 1% of the busiest, or the critical path would not drop)
    double the team of their largest 2-D matrix, if that cuts a member's cost by at least 10%
    (the unsplit m^3 term limits it). Then the owners' bins, biggest team first,
    are laid out on consecutive ranks, leader first: power-of-two teams laid out largest first
    each sit in an aligned block of their size, so within one block of ``max_team`` ranks.
    """
    if max_team & (max_team - 1) or max_team < 1:
        raise ValueError(f"Invalid max_team: {max_team} (expected a power of two)")
    teams: list[tuple[int, ...]] = [()] * len(shapes)
    if max_team == 1 or len(buckets) != 1:
        return list(owners), teams
    bins: dict[int, list[int]] = {}
    for i in buckets[0]:
        bins.setdefault(owners[i], []).append(i)
    size = dict.fromkeys(bins, 1)
    split: dict[int, int] = {}  # bin -> its team's matrix
    free = world_size - len(bins)

    def load(b: int) -> int:
        return sum(member_cost(shapes[i], size[b] if split.get(b) == i else 1, steps) for i in bins[b])

    while free > 0:
        # The busiest bins (within 1%) must all get faster, or the round's critical path stays.
        loads = {b: load(b) for b in bins}
        top = max(loads.values())
        busiest = [b for b in bins if loads[b] >= 0.99 * top]
        picks = {}
        for b in busiest:
            flat = [i for i in bins[b] if len(shapes[i]) == 2]
            i = split.get(b, max(flat, key=lambda i: (member_cost(shapes[i], 1, steps), -i), default=None))
            k = size[b]
            if i is None or 2 * k > max_team or (
                    member_cost(shapes[i], 2 * k, steps) > 0.9 * member_cost(shapes[i], k, steps)):
                break
            picks[b] = i
        need = sum(size[b] for b in busiest)
        if len(picks) < len(busiest) or need > free:
            break
        for b, i in picks.items():
            split[b], size[b] = i, 2 * size[b]
        free -= need
    new_owners, position = list(owners), 0
    for b in sorted(bins, key=lambda b: (-size[b], b)):
        for i in bins[b]:
            new_owners[i] = position
        if b in split:
            teams[split[b]] = tuple(range(position, position + size[b]))
        position += size[b]
    return new_owners, teams
