"""Orthogonalize shared matrices: gather each to its owner, run NS there, send results back."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from .._timing import PhaseTimer
from ..orthogonalize import NSConfig, orthogonalize
from .exchange import Exchange, ReplicaGroup
from .layout import MatrixLayout
from .plan import make_plan

__all__ = ["ShardingEngine"]


class ShardingEngine:
    """Owner plan + exchange for a fixed list of matrices held over one process group.

    Args:
        layouts: every matrix's piece layout (the same list, in the same order, on every rank).
        group: the process group the pieces are spread over (``None``: a world of one).
        policy: ``"round_robin"`` or ``"balanced"`` (see :mod:`marsm_dist.sharding.plan`).
        bucket_numel: at most this many elements of full matrices owned by one rank per round.
        timer: where communication and Newton-Schulz time is recorded.
        device: where this rank's shards live; the collectives' tensors are made there (the
            CPU when not given).
        replica_groups: for layouts with replicas, this rank's replica group per replica pattern
            (``layout.replicas``), over which results reach the other copies.
    """

    def __init__(self, layouts: list[MatrixLayout], group: dist.ProcessGroup | None,
                 policy: str = "balanced", bucket_numel: int = 1 << 26,
                 timer: PhaseTimer | None = None, device: torch.device | None = None,
                 replica_groups: dict[tuple[int, ...], ReplicaGroup] | None = None) -> None:
        world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        for layout in layouts:
            if layout.world_size != world:
                raise ValueError(f"a layout for {layout.shape} covers {layout.world_size} ranks, "
                                 f"but the process group has {world}")
        self.layouts, self.group, self.rank, self.world_size = layouts, group, rank, world
        self.replica_groups = replica_groups or {}
        self.plan = make_plan([lay.shape for lay in layouts], world, policy, bucket_numel)
        self.exchange = Exchange(group, rank, world)
        self.timer = timer or PhaseTimer()
        self.device = device or torch.device("cpu")
        if world > 1 and self.device.type != "meta":  # meta tensors (dry runs) hold no values to compare
            self._verify_same_on_every_rank()

    def _verify_same_on_every_rank(self) -> None:
        """One all-reduce at start-up: every rank must hold the same plan and layouts, or the
        exchanges would pair up wrongly (or hang)."""
        text = repr((self.plan.digest(), [(lay.shape, lay.pieces, lay.replicas) for lay in self.layouts]))
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        # On the shards' device: a process group serves only its own devices (NCCL: no CPU).
        t = torch.tensor([digest, -digest], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if t.tolist() != [digest, -digest]:
            raise RuntimeError(
                "MARSM: ranks disagree on the matrices to orthogonalize (shapes, order or sharding "
                "differ between ranks); every rank must build the optimizer from the same model"
            )

    def results(self, local: list[Tensor | None], configs: list[NSConfig | None]
                ) -> Iterator[tuple[int, Tensor]]:
        """NS of every active matrix, as ``(i, this rank's flat local shard in the NS dtype)``,
        bucket by bucket: a bucket's results are yielded as soon as they are back, so a caller
        that applies and drops each one holds no more than one bucket.

        ``local[i]`` is this rank's shard of matrix i's momentum, or ``None`` when matrix i sits
        out this step; that choice must be the same on every rank.
        """
        owners = self.plan.owners
        for bucket in self.plan.buckets:
            active = [i for i in bucket if local[i] is not None]
            for dtype in sorted({configs[i].dtype for i in active}, key=str):
                idx = [i for i in active if configs[i].dtype == dtype]
                device = local[idx[0]].device
                with self.timer.phase("communication"):
                    fulls = self.exchange.gather(
                        [(self.layouts[i], owners[i], local[i].reshape(-1)) for i in idx], dtype)
                mine = [k for k, i in enumerate(idx) if owners[i] == self.rank]
                with self.timer.phase("newton_schulz"):
                    done = orthogonalize([fulls[k] for k in mine], [configs[idx[k]] for k in mine])
                del fulls  # the gathered momenta: NS made its own copies
                outputs: list[Tensor | None] = [None] * len(idx)
                for k, o in zip(mine, done, strict=True):
                    outputs[k] = o
                del done
                items = [(self.layouts[i], owners[i]) for i in idx]
                with self.timer.phase("communication"):
                    shards = self.exchange.scatter(items, outputs, dtype, device)
                del outputs
                for k, i in enumerate(idx):  # the results owned in this rank's copy
                    if shards[k] is not None:
                        yield i, shards[k]
                # The other copies' results, one broadcast at a time (shards: what this rank sends).
                spread = self.exchange.spread([(lay, o, self.replica_groups.get(lay.replicas))
                                               for lay, o in items], shards, dtype, device)
                while True:
                    with self.timer.phase("communication"):
                        got = next(spread, None)
                    if got is None:
                        break
                    yield idx[got[0]], got[1]
                    del got
                del shards

    def orthogonalize(self, local: list[Tensor | None],
                      configs: list[NSConfig | None]) -> list[Tensor | None]:
        """:meth:`results` as a list (``None`` for matrices that sat out)."""
        out: list[Tensor | None] = [None] * len(local)
        for i, shard in self.results(local, configs):
            out[i] = shard
        return out
