"""Orthogonalize shared matrices: gather each to its owner, run NS there, send results back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._timing import PhaseTimer
from ..orthogonalize import NSConfig, orthogonalize
from .exchange import Exchange, Pending, ReplicaGroup, Spreading
from .layout import MatrixLayout
from .offload import Landing, Staging
from .plan import make_plan
from .subgroups import GroupRequest, OpenGroups, open_groups
from .team_runner import TeamRunner

__all__ = ["ShardingEngine"]


class ShardingEngine:
    """Owner plan + exchange for a fixed list of matrices held over one process group.

    Args:
        layouts: every matrix's piece layout (the same list, in the same order, on every rank).
        group: the process group the pieces are spread over (``None``: a world of one).
        policy: ``"round_robin"`` or ``"balanced"`` (see :mod:`marsm_dist.sharding.plan`).
        bucket_numel: at most this many elements of full matrices owned by one rank per round.
        timer: where communication and Newton-Schulz time is recorded.
        device: where the collectives' tensors are made and the owners' Newton-Schulz runs: where
            this rank's shards live, or with ``staging`` the device they are staged to (the CPU
            when not given).
        replica_groups: for layouts with replicas, this rank's replica group per replica pattern
            (``layout.replicas``), over which results reach the other copies. A group still to be
            made (a :class:`~marsm_dist.sharding.subgroups.GroupRequest`) is made here, after
            the plan check, by every rank alike.
        overlap: pipeline the rounds (see :meth:`results`).
        max_team: up to this many ranks (a power of two) split one matrix's Newton-Schulz where
            ranks would otherwise sit idle (:mod:`marsm_dist.sharding.teams`); 1: never.
        staging: for shards held on the host while the group serves ``device`` (optimizer offload):
            each round's pieces go to ``device`` through it, and the results come back through it
            (:mod:`marsm_dist.sharding.offload`). None: the shards are on ``device``.
    """

    def __init__(self, layouts: list[MatrixLayout], group: dist.ProcessGroup | None,
                 policy: str = "balanced", bucket_numel: int = 1 << 26,
                 timer: PhaseTimer | None = None, device: torch.device | None = None,
                 replica_groups: dict[tuple[int, ...], ReplicaGroup] | None = None,
                 overlap: bool = True, max_team: int = 1, staging: Staging | None = None) -> None:
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        for layout in layouts:
            if layout.world_size != world:
                raise ValueError(f"a layout for {layout.shape} covers {layout.world_size} ranks, "
                                 f"but the process group has {world}")
        self.layouts, self.group, self.rank, self.world_size = layouts, group, rank, world
        self.replica_groups = replica_groups or {}
        self.overlap, self.bucket_numel = overlap, bucket_numel
        self.plan = make_plan([lay.shape for lay in layouts], world, policy, bucket_numel, max_team=max_team,
                              candidates=[lay.preferred_owners for lay in layouts])
        self.exchange = Exchange(group, rank, world)
        self.timer = timer or PhaseTimer()
        self.device = device or torch.device("cpu")
        self.staging = staging
        if world > 1:
            self._verify_same_on_every_rank()
        # Only now, with the plan the same everywhere, the groups it needs (NCCL: made by every
        # rank of the job group, in one order).
        self._opened: list[OpenGroups] = []
        for rg in self.replica_groups.values():
            if isinstance(rg.group, GroupRequest):
                self._opened.append(open_groups(rg.group, self.device))
                rg.group = self._opened[-1].group_of(rg.group.set_of(dist.get_rank()))
        self.teams = TeamRunner(self.plan.teams, group, rank, self.exchange.counters, self.device)
        self._in_team = {i for i in range(len(layouts)) if self.teams.member_of(i)}  # asked per matrix

    def close(self) -> None:
        """Release the process groups this plan made (each is destroyed when no plan uses it).
        Every rank of the job group calls it at the same point, as it built the engine."""
        self.teams.close()
        for opened in self._opened:
            opened.close()
        self._opened = []

    def _verify_same_on_every_rank(self) -> None:
        """One all-reduce at start-up: every rank must hold the same plan, layouts and sub-groups
        to make, or the exchanges would pair up wrongly (or hang). On ``meta`` (a dry run) the
        all-reduce runs but holds no values to compare."""
        requests = [(pattern, rg.group.sets if isinstance(rg.group, GroupRequest) else None)
                    for pattern, rg in self.replica_groups.items()]
        text = repr((self.plan.digest(), [(lay.shape, lay.pieces, lay.replicas) for lay in self.layouts],
                     requests))
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        # On the shards' device: a process group serves only its own devices (NCCL: no CPU).
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if self.device.type != "meta" and t.tolist() != [digest, -digest]:
            raise RuntimeError(
                "MARSM: ranks disagree on the matrices to orthogonalize (shapes, order or sharding "
                "differ between ranks); every rank must build the optimizer from the same model"
            )

    def results(self, local: list[Tensor | None], configs: list[NSConfig | None]
                ) -> Iterator[tuple[int, Tensor]]:
        """NS of every active matrix, as ``(i, this rank's flat local shard in the NS dtype)``,
        round by round: a round's results are yielded as soon as they are back, so a caller that
        applies and drops each one holds no more than about two rounds (one with ``overlap``
        off).

        With ``overlap`` (default), the rounds are pipelined: round k+1's gather is in flight while
        round k is orthogonalized, and round k's scatter while round k+1 is, so communication
        hides behind Newton-Schulz where it is shorter. A round with copies (DDP, HSDP) has its
        scatter waited for before round k+1's Newton-Schulz instead, so that its broadcasts to the
        other copies (the larger part, across nodes) run during it, within a window of one bucket
        of buffers. Every rank starts the collectives of the job group in the same order (gather 0,
        gather 1, scatter 0, gather 2, scatter 1, ...), and the members of a replica group, which
        hold the same pieces, start its broadcasts in the same order, so they pair up on any
        backend.

        ``local[i]`` is this rank's shard of matrix i's momentum, or ``None`` when matrix i sits
        out this step; that choice must be the same on every rank.
        """
        rounds = []
        for bucket in self.plan.buckets:
            active = [i for i in bucket if local[i] is not None]
            for dtype in sorted({configs[i].dtype for i in active}, key=str):
                rounds.append((dtype, [i for i in active if configs[i].dtype == dtype]))
        gathering = self._start_gather(rounds[0], local) if rounds else None
        previous: _Round | None = None  # the round whose results are on their way back
        for k, (dtype, idx) in enumerate(rounds):
            with self.timer.phase("communication"):
                fulls = gathering.wait()
                if self.overlap and k + 1 < len(rounds):
                    gathering = self._start_gather(rounds[k + 1], local)
                if previous is not None and (previous.replicated or self.staging is not None):
                    # Its broadcasts to the other copies need its scatter done: wait for that now,
                    # so they run during this round's Newton-Schulz. Staged: its copies to the host
                    # are queued now, before this round's Newton-Schulz, which they need not wait for.
                    self._start_spread(previous)
            device = self.device if self.staging is not None else local[idx[0]].device
            outputs = self._newton_schulz(idx, fulls, configs, device)
            del fulls  # the gathered momenta: NS made its own copies
            with self.timer.phase("communication"):
                scattering = self.exchange.start_scatter(self._items(idx), outputs, dtype, device)
                replicated = any(self.layouts[i].num_replicas > 1 for i in idx)
                started = _Round(dtype, idx, scattering, device, replicated)
            del outputs  # copied into the send buffer
            if previous is not None:
                yield from self._deliver(previous)
            previous = started
            if not self.overlap:
                yield from self._deliver(previous)
                previous = None
                if k + 1 < len(rounds):
                    with self.timer.phase("communication"):
                        gathering = self._start_gather(rounds[k + 1], local)
        if previous is not None:
            yield from self._deliver(previous)

    def _newton_schulz(self, idx: list[int], fulls: list[Tensor | None], configs: list[NSConfig | None],
                       device: torch.device) -> list[Tensor | None]:
        """NS of the round's matrices this rank owns alone, and of the one its team splits."""
        mine = [j for j, i in enumerate(idx)
                if self.plan.owners[i] == self.rank and i not in self._in_team]
        outputs: list[Tensor | None] = [None] * len(idx)
        with self.timer.phase("newton_schulz"):
            done = orthogonalize([fulls[j] for j in mine], [configs[idx[j]] for j in mine])
            for j, o in zip(mine, done, strict=True):
                outputs[j] = o
            del done
            for j, i in enumerate(idx):  # at most one team per rank and round
                if i in self._in_team:
                    outputs[j] = self.teams.orthogonalize(i, self.layouts[i].shape, fulls[j], configs[i],
                                                          device)
        return outputs

    def _items(self, idx: list[int]) -> list[tuple[MatrixLayout, int]]:
        return [(self.layouts[i], self.plan.owners[i]) for i in idx]

    def _start_gather(self, round_: tuple[torch.dtype, list[int]], local: list[Tensor | None]) -> Pending:
        dtype, idx = round_
        flats = [local[i].reshape(-1) for i in idx]
        if self.staging is not None:  # host shards: to the exchange device, in the round's dtype
            flats = self.staging.to_device(flats, dtype)
        return self.exchange.start_gather(
            [(self.layouts[i], self.plan.owners[i], flat) for i, flat in zip(idx, flats, strict=True)], dtype)

    def _start_spread(self, r: _Round) -> None:
        """Wait for round ``r``'s scatter and start its broadcasts to the other copies."""
        r.shards = r.scattering.wait()
        if self.staging is not None:
            r.landing = self.staging.to_host(r.shards)
        window = self.bucket_numel if self.overlap else 0
        r.spreading = self.exchange.spread(
            [(lay, o, self.replica_groups.get(lay.replicas)) for lay, o in self._items(r.idx)],
            r.shards, r.dtype, r.device, window)

    def _deliver(self, r: _Round) -> Iterator[tuple[int, Tensor]]:
        """A round's results: those owned in this rank's copy (the scatter), then the other
        copies' (as each broadcast lands)."""
        if r.spreading is None:
            with self.timer.phase("communication"):
                self._start_spread(r)
        shards = r.shards
        if r.landing is not None:
            with self.timer.phase("communication"):
                shards, r.landing = r.landing.wait(), None
        for j, i in enumerate(r.idx):
            if shards[j] is not None:
                yield i, shards[j]
        del shards
        got = iter(r.spreading)
        while True:
            with self.timer.phase("communication"):
                item = next(got, None)
                if item is not None and self.staging is not None:
                    item = item[0], self.staging.to_host([item[1]]).wait()[0]
            if item is None:
                break
            yield r.idx[item[0]], item[1]
            del item

    def orthogonalize(self, local: list[Tensor | None],
                      configs: list[NSConfig | None]) -> list[Tensor | None]:
        """:meth:`results` as a list (``None`` for matrices that sat out)."""
        out: list[Tensor | None] = [None] * len(local)
        for i, shard in self.results(local, configs):
            out[i] = shard
        return out


@dataclass
class _Round:
    """One round on its way back: its scatter in flight, then its results, then its broadcasts."""

    dtype: torch.dtype
    idx: list[int]
    scattering: Pending
    device: torch.device
    replicated: bool
    shards: list[Tensor | None] | None = None
    spreading: Spreading | None = None
    landing: Landing | None = None  # staged: this rank's results on their way to the host


