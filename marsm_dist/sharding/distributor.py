"""The distributor: for every matrix of a step, where its Newton-Schulz runs and how the
result comes back. The optimizer hands it momenta and takes back each rank's share of the
orthogonalized result; it never asks which topology it runs on.

| a matrix is                                   | its NS runs on                    | the result comes back  |
|-----------------------------------------------|-----------------------------------|------------------------|
| this process's own tensor (no layout)         | this process                      | nothing to send        |
| held over a group (a ``MatrixLayout``)        | one owner rank of the whole group | scattered to its copy, |
| (1-D/2-D sharded, replicated, or both)        | (gathered from the owner's copy)  | broadcast to the other |
|                                               |                                   | copies                 |

Replicated data parallel is a layout whose every rank is a copy of its own; HSDP, a layout whose
copies are the replica groups; FSDP x TP and Megatron TP x DP, pieces of 2-D blocks (with DP copies
for Megatron without the distributed optimizer). See :mod:`marsm_dist.sharding.layout`.

Shards on the CPU under a group that serves only CUDA (optimizer offload over NCCL) are staged
to the group's device for the exchange and Newton-Schulz, and their results staged back
(:mod:`marsm_dist.sharding.offload`); own tensors stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._timing import PhaseTimer
from ..functional import chunks
from ..newton_schulz import newton_schulz_flops
from ..orthogonalize import NSConfig, matrix_view_shape, orthogonalize
from .engine import ShardingEngine
from .layout import MatrixLayout
from .offload import Staging
from .topology import exchange_device as exchange_device_of
from .topology import replica_groups

__all__ = ["Distributor", "MatrixSpec"]


@dataclass(frozen=True)
class MatrixSpec:
    """One matrix the distributor serves.

    Attributes:
        shape: the full logical shape.
        layout: the pieces every rank of the job group holds; None for this process's own tensor.
        replica_group: for a layout with replicas, this rank's replica group (the ranks holding
            the same pieces as this rank, one per copy), or a ``GroupRequest`` that makes it.
        name: for messages.
    """

    shape: tuple[int, ...]
    layout: MatrixLayout | None = None
    replica_group: Any = None
    name: str = ""


class Distributor:
    """Runs Newton-Schulz for a fixed list of matrices, each once in the whole job.

    Args:
        matrices: every matrix, in the same order on every rank for those with a layout.
        group: the job group the layouts are described over (None: only own tensors).
        device: where the shards live.
        policy, bucket_numel: the owner plan's policy and the bucket size (elements).
        timer: where communication and Newton-Schulz time is recorded.
        overlap, max_team: pipeline the exchange rounds; split matrices over teams of idle ranks
            (see :class:`ShardingEngine`).
        exchange_device: where the collectives' tensors are made and shared matrices' Newton-Schulz
            runs. None: the job group's device for the shards (``device`` itself, or the current
            CUDA device for CPU shards under an NCCL-only group), staged to when it is not
            ``device``. Given: always staged to, even when it is ``device`` (the tests run the
            staging on the CPU so).
        pin_memory: stage through pinned host buffers; None: where the exchange device is CUDA.
    """

    def __init__(self, matrices: list[MatrixSpec], group: dist.ProcessGroup | None,
                 device: torch.device | None, *, policy: str = "balanced", bucket_numel: int = 1 << 26,
                 timer: PhaseTimer | None = None, overlap: bool = True, max_team: int = 1,
                 exchange_device: torch.device | None = None, pin_memory: bool | None = None) -> None:
        self.matrices = matrices
        self.timer = timer or PhaseTimer()
        self.bucket_numel = bucket_numel
        self.group, self.device = group, device
        self.exchange_device = exchange_device or exchange_device_of(group, device)
        self.staging: Staging | None = None
        staged = exchange_device is not None or self.exchange_device != device
        if self.exchange_device is not None and staged:
            self.staging = Staging(self.exchange_device, pin_memory, host=device)
        self.own = [i for i, m in enumerate(matrices) if m.layout is None]
        self.shared = [i for i, m in enumerate(matrices) if m.layout is not None]
        self._shared_index = {i: e for e, i in enumerate(self.shared)}
        self.engine: ShardingEngine | None = None
        if self.shared:
            self.engine = ShardingEngine([matrices[i].layout for i in self.shared], group, policy,
                                         bucket_numel, self.timer, self.exchange_device,
                                         replica_groups(matrices, self.shared, group), overlap,
                                         max_team, self.staging)
        # Fixed by the plan: read once here, not from the plan on every step.
        self._flops_balance = self.engine.plan.flops_balance if self.engine is not None else 1.0

    def close(self) -> None:
        """Release the process groups the plan made (every rank of the job group, at one point)."""
        if self.engine is not None:
            self.engine.close()

    @property
    def world_size(self) -> int:
        """Ranks in the job group (1 when there is none)."""
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return self.engine.rank if self.engine is not None else 0

    def is_shared(self, i: int) -> bool:
        """True if matrix ``i`` is held over the job group (its statistics are summed over it)."""
        return i in self._shared_index

    def counts_here(self, i: int) -> bool:
        """True if this rank's part of matrix ``i`` counts in sums over the job group: the ranks of
        one copy hold each element once, so only copy 0 adds its parts (the others add zero)."""
        m = self.matrices[i]
        return m.layout is None or m.layout.replica_of(self.rank) == 0

    def sum_over_ranks(self, vec: Tensor) -> Tensor:
        """Sum ``vec`` over the job group (a no-op for a world of one), on the group's device."""
        if self.group is None or dist.get_world_size(self.group) == 1:
            return vec
        out = vec.to(self.exchange_device)
        dist.all_reduce(out, group=self.group)
        if out.device.type == "meta" and vec.device.type != "meta":
            return vec * self.world_size  # a dry run: no sums to read; as if every rank held these
        return out.to(vec.device)

    def results(self, momenta: list[Tensor | None], configs: list[NSConfig | None]
                ) -> Iterator[tuple[int, Tensor]]:
        """``(i, NS(M_i) as this rank's part)`` for every matrix whose momentum is given: own
        tensors in their shape, shared ones as this rank's flat pieces. Results come bucket by
        bucket; a caller that applies and drops each holds about one bucket at a time."""
        own = [i for i in self.own if momenta[i] is not None]
        for bucket in chunks([momenta[i].numel() for i in own], self.bucket_numel):
            ids = [own[b] for b in bucket]
            with self.timer.phase("newton_schulz"):
                done = orthogonalize([momenta[i].view(self.matrices[i].shape) for i in ids],
                                     [configs[i] for i in ids])
            yield from zip(ids, done, strict=True)
            del done
        if self.engine is not None:
            local = [momenta[i] for i in self.shared]
            cfgs = [configs[i] for i in self.shared]
            for e, shard in self.engine.results(local, cfgs):
                yield self.shared[e], shard

    # ----------------------------------------------------------------------- what a step did
    def ns_flops(self, active: list[bool], configs: list[NSConfig]) -> int:
        """Newton-Schulz FLOPs this rank runs: its own active tensors, and the shared ones it owns."""
        flops = sum(newton_schulz_flops(matrix_view_shape(self.matrices[i].shape, configs[i].flatten),
                                        configs[i].steps) for i in self.own if active[i])
        return flops + (self.engine.plan.ns_flops[self.rank] if self.engine is not None else 0)

    @property
    def flops_balance(self) -> float:
        """The plan's busiest rank's Newton-Schulz FLOPs over the mean (1.0: none shared)."""
        return self._flops_balance

    @property
    def owned_matrices(self) -> int:
        return sum(o == self.rank for o in self.engine.plan.owners) if self.engine is not None else 0

    def exchanged_bytes(self) -> tuple[int, int]:
        if self.engine is None:
            return 0, 0
        c = self.engine.exchange.counters
        return c.bytes_sent, c.bytes_received
