"""The owner plan: which rank orthogonalizes each matrix, and which matrices share an exchange.

Pure functions of the matrices' shapes and the world size, so every rank computes the same plan
with no communication (the engine still compares a digest across ranks once, to catch ranks that
were handed different parameters).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from ..newton_schulz import newton_schulz_flops

__all__ = ["OWNER_POLICIES", "ExchangePlan", "make_plan", "plan_buckets", "plan_owners"]

OWNER_POLICIES = ("round_robin", "balanced")


@dataclass(frozen=True)
class ExchangePlan:
    """Owners and exchange rounds for a list of matrices.

    Attributes:
        world_size: ranks in the process group.
        owners: ``owners[i]`` is the rank that orthogonalizes matrix ``i``.
        buckets: matrix indices per exchange round (one gather and one scatter each).
        ns_flops: predicted Newton-Schulz FLOPs per rank for one step.
    """

    world_size: int
    owners: tuple[int, ...]
    buckets: tuple[tuple[int, ...], ...]
    ns_flops: tuple[int, ...]

    @property
    def flops_balance(self) -> float:
        """max / mean of the per-rank Newton-Schulz FLOPs (1.0 is perfect balance)."""
        mean = sum(self.ns_flops) / self.world_size
        return max(self.ns_flops) / mean if mean else 1.0

    def digest(self) -> int:
        """A 62-bit fingerprint of the plan, equal on ranks that computed the same plan."""
        text = repr((self.world_size, self.owners, self.buckets)).encode()
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
    """Group matrices (in index order) into exchange rounds so that no rank owns more than
    ``bucket_numel`` elements of full matrices in one round: that bounds the extra memory. A
    matrix larger than the bound gets a round of its own."""
    buckets, current, owned = [], [], [0] * world_size
    for i, (n, owner) in enumerate(zip(numels, owners, strict=True)):
        if current and owned[owner] + n > bucket_numel:
            buckets.append(tuple(current))
            current, owned = [], [0] * world_size
        current.append(i)
        owned[owner] += n
    if current:
        buckets.append(tuple(current))
    return buckets


def make_plan(
    shapes: list[tuple[int, ...]],
    world_size: int,
    policy: str = "balanced",
    bucket_numel: int = 1 << 26,
    ns_steps: int = 5,
) -> ExchangePlan:
    """The plan for matrices of ``shapes`` over ``world_size`` ranks."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"Invalid bucket size: {bucket_numel} elements")
    costs = [newton_schulz_flops(s if len(s) >= 2 else (1, *s), ns_steps) for s in shapes]
    owners = plan_owners(costs, world_size, policy)
    flops = [0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        flops[owner] += cost
    buckets = plan_buckets([math.prod(s) for s in shapes], owners, world_size, bucket_numel)
    return ExchangePlan(world_size, tuple(owners), tuple(buckets), tuple(flops))
