"""FSDP2 and DTensor parameters on any device mesh: 1-D ``fully_shard``, HSDP, FSDP x TP.

Registered by :mod:`marsm_dist.sharding.adapter` at its first lookup (nothing to import), so
``MARSM(sharded_model.parameters())`` just works.
A DTensor's placements say which indices of each dim a mesh coordinate holds: ``Shard(d)`` cuts
dim ``d`` as ``torch.chunk`` does (uneven, possibly empty), ``_StridedShard`` is the FSDP-after-TP
form, ``Replicate()`` makes copies. This adapter turns them into a piece layout over the whole
mesh (see :func:`marsm_dist.sharding.layout.from_runs`), so each matrix's Newton-Schulz runs once
in the whole job, whatever the mesh.

State tensors are DTensors with the parameter's mesh and placements, which is what
``torch.distributed.checkpoint`` needs to save and reshard them (a plain local tensor would be
saved as if replicated, and every rank would get one rank's shard back).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..sharding.adapter import ShardingAdapter, check_group_serves, register_adapter
from ..sharding.layout import MatrixLayout, Runs, from_runs
from ..sharding.subgroups import GroupRequest

__all__ = ["FSDP2Adapter", "dtensor_layout", "register"]

#: Asked after every framework adapter (see marsm_dist.sharding.adapter): DTensor is torch's own type.
PRIORITY = 10


def _runs_of_tensor(idx: Tensor) -> Runs:
    """Runs of consecutive ascending indices in a 1-D integer tensor (one host read)."""
    if idx.numel() == 0:
        return ()
    breaks = (torch.nonzero(idx[1:] - idx[:-1] != 1).flatten() + 1).tolist()
    values = idx.tolist()
    bounds = [0, *breaks, len(values)]
    return tuple((values[a], values[b - 1] + 1) for a, b in zip(bounds, bounds[1:], strict=False))


@lru_cache(maxsize=4096)
def _dim_runs(n: int, dim: int, chain: tuple) -> Runs:
    """The indices of a dim of size ``n`` that survive ``chain``: (placement, mesh dim size,
    coordinate) for each mesh dim that shards ``dim``, applied left to right as DTensor does."""
    idx = torch.arange(n)
    for placement, size, coord in chain:
        # The placement splits its own dim: give it the index vector along that dim.
        parts, _ = placement._split_tensor(idx.view([1] * dim + [-1]), size, with_padding=False,
                                           contiguous=True)
        parts = [t.reshape(-1) for t in parts]
        idx = parts[coord] if coord < len(parts) else idx[:0]
    return _runs_of_tensor(idx)


def _shards(placement) -> bool:
    # _StridedShard (private in torch 2.6-2.14; FSDP2 makes it after TP) is not a Shard subclass.
    return isinstance(placement, (Shard, _StridedShard))


def _check_placements(p: DTensor) -> None:
    for placement in p.placements:
        if not (placement.is_replicate() or _shards(placement)):
            raise NotImplementedError(
                f"MARSM cannot step a DTensor parameter of shape {tuple(p.shape)} with placements "
                f"{tuple(p.placements)}: {placement} is not supported (Shard, _StridedShard and "
                f"Replicate are)")


def job_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """One process group over all of ``mesh``'s ranks (the default group when the mesh spans
    the world, which is how FSDP2 and torchtitan jobs are set up)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    if not mesh.mesh_dim_names:
        raise NotImplementedError(f"MARSM needs a {mesh.ndim}-D mesh that spans the world, or one with "
                                  f"mesh_dim_names (so it can be flattened); got {mesh}")
    return mesh._flatten().get_group()


@lru_cache(maxsize=16)
def _coordinates(mesh: DeviceMesh) -> dict[int, tuple[int, ...]]:
    """Global rank -> its coordinate in ``mesh`` (once per mesh, not once per parameter)."""
    coords: dict[int, tuple[int, ...]] = {}
    for index, g in enumerate(mesh.mesh.reshape(-1).tolist()):
        coord = []
        for size in reversed(tuple(mesh.shape)):
            index, c = divmod(index, size)
            coord.append(c)
        coords[g] = tuple(reversed(coord))
    return coords


@lru_cache(maxsize=16)
def _copies_group(mesh: DeviceMesh, dims: tuple[int, ...]) -> dist.ProcessGroup | GroupRequest:
    """This rank's replica group for Replicate() on the mesh dims ``dims``: the ranks whose
    coordinates differ from this rank's only there (they hold the same pieces, one per copy).
    One dim: that dim's group. Several (HSDP x TP: a weight the TP plan replicates is a copy per
    (replicate, tp) coordinate): a request for one group per coordinate of the other dims, which
    the optimizer makes on every rank of the mesh once its plan is checked."""
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    kept = [m for m in range(mesh.ndim) if m not in dims]
    sets: dict[tuple[int, ...], list[int]] = {}
    for g, c in sorted(_coordinates(mesh).items()):
        sets.setdefault(tuple(c[m] for m in kept), []).append(g)
    return GroupRequest(job_group(mesh), tuple(tuple(s) for _, s in sorted(sets.items())))


def dtensor_layout(shape: tuple[int, ...], mesh: DeviceMesh, placements: tuple, group_ranks: list[int]
                   ) -> MatrixLayout:
    """The piece layout of a DTensor of ``shape`` over the ranks ``group_ranks`` (global ranks, in
    the job group's order), with one copy per coordinate of its Replicate() mesh dims."""
    coords = _coordinates(mesh)
    replicate_dims = [m for m, pl in enumerate(placements) if pl.is_replicate()]
    runs, replicas = [], []
    for g in group_ranks:
        coord = coords[g]
        runs.append(tuple(
            _dim_runs(n, d, tuple((pl, mesh.size(m), coord[m]) for m, pl in enumerate(placements)
                                  if _shards(pl) and pl.dim == d))
            for d, n in enumerate(shape)))
        replicas.append(sum(coord[m] * math.prod(mesh.size(k) for k in replicate_dims[i + 1:])
                            for i, m in enumerate(replicate_dims)))
    return from_runs(tuple(shape), runs, replicas if replicate_dims else None)


def _enclosing_mesh(mesh: DeviceMesh, ranks: list[int]) -> DeviceMesh | None:
    """The mesh over exactly ``ranks`` that ``mesh`` is a sub-mesh of: the root mesh, or, when the
    root spans more (pipeline stages: a (pp, dp, tp) root, one stage's ranks), the root's slice
    over the dims along which ``ranks`` differ. None when there is none (unnamed dims, ranks
    that are no slice of the root, or ``mesh`` itself)."""
    root = mesh._get_root_mesh()  # private in torch 2.6-2.14
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if root is mesh or not names or not root_names or not set(names) <= set(root_names):
        return None
    coords = _coordinates(root)
    if any(r not in coords for r in ranks):
        return None
    kept = tuple(n for m, n in enumerate(root_names) if n in names or len({coords[r][m] for r in ranks}) > 1)
    if kept != root_names:
        root = root[kept[0] if len(kept) == 1 else kept]
    return root if sorted(root.mesh.reshape(-1).tolist()) == sorted(ranks) else None


class FSDP2Adapter(ShardingAdapter):
    """DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism, HSDP) on any mesh."""

    name = "fsdp2"
    prepopulate_state = True

    def handles(self, p: Tensor) -> bool:
        return isinstance(p, DTensor)

    def _check(self, p: DTensor) -> None:
        _check_placements(p)
        # At construction (state is created then): CPUOffloadPolicy keeps the shards on the CPU.
        check_group_serves(p.device_mesh.get_group(0), p.to_local().device,
                           f"a DTensor parameter of shape {tuple(p.shape)}")

    def local(self, t: Tensor) -> Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def zeros_state(self, p: Tensor) -> Tensor:
        self._check(p)
        if p.to_local().device.type != p.device_mesh.device_type:
            # CPUOffloadPolicy: the state stays with the shard (from_local would move it to the mesh's device)
            return torch.zeros_like(p, memory_format=torch.preserve_format)
        local = torch.zeros_like(p.to_local(), memory_format=torch.preserve_format)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def process_group(self, p: Tensor) -> dist.ProcessGroup:
        self._check(p)
        return job_group(p.device_mesh)

    def replica_group(self, p: Tensor) -> dist.ProcessGroup | GroupRequest | None:
        dims = tuple(m for m, pl in enumerate(p.placements) if pl.is_replicate())
        return _copies_group(p.device_mesh, dims) if dims else None

    def root_group(self, p: Tensor) -> dist.ProcessGroup | None:
        root = p.device_mesh._get_root_mesh()  # private in torch 2.6-2.14
        if root is p.device_mesh or not root.mesh_dim_names:
            return None
        return job_group(root)

    def widen(self, p: Tensor, group: dist.ProcessGroup
              ) -> tuple[MatrixLayout, dist.ProcessGroup | GroupRequest | None] | None:
        """A parameter on a sub-mesh (FSDP2's dp mesh, for a module left out of the TP plan) is a
        copy per coordinate of the root mesh's other dim: lift it there when the root spans
        ``group``. Needs named mesh dims."""
        mesh = p.device_mesh
        ranks = dist.get_process_group_ranks(group)
        root = _enclosing_mesh(mesh, ranks)
        if root is None:
            return None
        names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
        placements = [Replicate()] * root.ndim
        for name, placement in zip(names, p.placements, strict=True):
            placements[root_names.index(name)] = placement
        copies = tuple(m for m, pl in enumerate(placements) if pl.is_replicate())
        layout = dtensor_layout(tuple(p.shape), root, tuple(placements), ranks)
        return layout, (_copies_group(root, copies) if copies else None)

    def layout(self, p: Tensor) -> MatrixLayout:
        self._check(p)
        ranks = dist.get_process_group_ranks(job_group(p.device_mesh))
        return dtensor_layout(tuple(p.shape), p.device_mesh, tuple(p.placements), ranks)


def register() -> None:
    """Register the FSDP2 adapter (the registry calls this at its first lookup; idempotent)."""
    register_adapter(FSDP2Adapter(), priority=PRIORITY)
