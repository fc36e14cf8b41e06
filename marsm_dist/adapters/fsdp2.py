"""FSDP2 (``torch.distributed.fsdp.fully_shard``): DTensor parameters sharded ``Shard(0)``.

Registered when ``marsm_dist`` is imported, so ``MARSM(sharded_model.parameters())`` just works.
Each rank holds a run of whole rows (``torch.chunk`` semantics: uneven, possibly empty). State
tensors are DTensors with the parameter's mesh and placements, which is what
``torch.distributed.checkpoint`` needs to save and reshard them (a plain local tensor would be
saved as if replicated, and every rank would get one rank's shard back).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from ..sharding.adapter import ShardingAdapter, check_group_serves, register_adapter
from ..sharding.layout import MatrixLayout, row_chunks

__all__ = ["FSDP2Adapter"]


class FSDP2Adapter(ShardingAdapter):
    """DTensor parameters on a 1-D device mesh with ``Shard(0)`` placement."""

    name = "fsdp2"
    prepopulate_state = True

    def handles(self, p: Tensor) -> bool:
        return isinstance(p, DTensor)

    def _check(self, p: DTensor) -> None:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"MARSM supports DTensor parameters sharded Shard(0) on a 1-D mesh (FSDP2's "
                f"default); got placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh"
            )
        # At construction (state is created then): CPUOffloadPolicy keeps the shards on the CPU.
        check_group_serves(p.device_mesh.get_group(), p.to_local().device,
                           f"a DTensor parameter of shape {tuple(p.shape)}")

    def local(self, t: Tensor) -> Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def zeros_state(self, p: Tensor) -> Tensor:
        self._check(p)
        local = torch.zeros_like(p.to_local(), memory_format=torch.preserve_format)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def process_group(self, p: Tensor) -> dist.ProcessGroup:
        self._check(p)
        return p.device_mesh.get_group()

    def layout(self, p: Tensor) -> MatrixLayout:
        self._check(p)
        return row_chunks(tuple(p.shape), p.device_mesh.size())


register_adapter(FSDP2Adapter())
