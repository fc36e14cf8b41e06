"""Run the plan's teams: the owner hands its team the full matrix, each member orthogonalizes its
columns with the others (:func:`split_newton_schulz`), and the owner collects the columns.

The owner gathers the matrix as for any other (the exchange does not change); inside the team the
matrix goes out once by broadcast and the columns come back by one gather, on the team's own
process group (its ranks are consecutive: one node when the team fits in one). Padding makes the
columns equal for the gather; nothing else is padded.

The teams' groups are made together by every rank of the job group, members or not, once the
plan has been checked the same on every rank (:mod:`marsm_dist.sharding.subgroups`), and shared
with any other plan that has the same teams.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..orthogonalize import NSConfig
from .exchange import ExchangeCounters
from .split_newton_schulz import split_newton_schulz
from .subgroups import GroupRequest, OpenGroups, open_groups

__all__ = ["TeamRunner"]


class TeamRunner:
    """The teams of one plan, as seen from this rank.

    Args:
        teams: per matrix, its team as job-group ranks (owner first), or ``()``.
        group: the job group (None: a world of one, which has no teams).
        rank: this rank in the job group.
        counters: where the team's bytes are added (the exchange's).
        device: where the job group's collectives take their tensors.

    Every rank of the job group builds it at the same point (it makes the teams' groups).
    """

    def __init__(self, teams: tuple[tuple[int, ...], ...], group: dist.ProcessGroup | None, rank: int,
                 counters: ExchangeCounters, device: torch.device) -> None:
        self.teams, self.rank, self.counters = teams, rank, counters
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self._open: OpenGroups | None = None
        every = sorted({t for t in teams if t})
        if every and group is not None:
            job = dist.get_process_group_ranks(group)
            in_job = {team: tuple(job[r] for r in team) for team in every}
            self._open = open_groups(GroupRequest(group, tuple(in_job.values())), device)
            for team in every:
                if rank in team:
                    self.groups[team] = self._open.group_of(in_job[team])

    def close(self) -> None:
        """Release the teams' groups (destroyed when no other plan uses them)."""
        if self._open is not None:
            self._open.close()
            self._open, self.groups = None, {}

    def member_of(self, i: int) -> bool:
        """True if this rank is in matrix ``i``'s team."""
        return bool(self.teams) and self.rank in self.teams[i]

    def orthogonalize(self, i: int, shape: tuple[int, ...], full: Tensor | None, cfg: NSConfig,
                      device: torch.device) -> Tensor | None:
        """NS of matrix ``i`` by its team: the owner passes its full matrix and gets NS of it back;
        the other members pass None and get None."""
        team = self.teams[i]
        group = self.groups[team]
        k, j = len(team), team.index(self.rank)
        rows, cols = shape
        m, n = min(rows, cols), max(rows, cols)
        wide = torch.empty((m, n), dtype=cfg.dtype, device=device)
        if full is not None:  # the owner: the wide orientation, contiguous, as one buffer
            wide.copy_(full.view(shape).mT if rows > cols else full.view(shape))
            self.counters.bytes_sent += wide.numel() * wide.element_size() * (k - 1)
        else:
            self.counters.bytes_received += wide.numel() * wide.element_size()
        self.counters.calls += 2
        dist.broadcast(wide, group=group, group_src=0)
        width = -(-n // k)
        lo, hi = min(j * width, n), min((j + 1) * width, n)
        block = split_newton_schulz(wide[:, lo:hi].contiguous(), group, cfg.steps, dtype=cfg.dtype,
                                    coefficients=cfg.coefficients)
        del wide
        self.counters.calls += cfg.steps + 1
        padded = block.new_zeros((m, width))
        padded[:, :hi - lo].copy_(block)
        itemsize = padded.element_size()
        if j == 0:
            parts = [torch.empty_like(padded) for _ in range(k)]
            dist.gather(padded, parts, group=group, group_dst=0)
            self.counters.bytes_received += padded.numel() * itemsize * (k - 1)
            out = torch.cat(parts, dim=1)[:, :n]
            return (out.mT if rows > cols else out).contiguous()
        dist.gather(padded, None, group=group, group_dst=0)
        self.counters.bytes_sent += padded.numel() * itemsize
        return None
