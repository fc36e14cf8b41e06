"""DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``) under ZeRO-1/2: each global expert once.

``Experts`` deep-copies the expert module ``num_local = E / EP`` times on every expert-parallel
(EP) rank and marks its parameters ``allreduce=False``, ``group_name = "ep_size_{EP}"``: local
expert ``j`` on EP rank ``e`` is global expert ``e * num_local + j``. The engine puts them in param
groups with ``"moe": True`` and ``"name": "ep_size_{EP}"``, and ZeRO flattens such a group and
partitions it over the expert-data-parallel (EDP) group (``real_dp_process_group[i]``, W / EP
ranks): every rank's flat partition holds ranges of its own local experts only.

On its own that partition would be described over the EDP group, and ranks of different EP ranks
would see "the same" matrix (local expert ``j``) that is in truth EP different experts. Here each
local expert parameter is described instead as one virtual ``(EP, *shape)`` tensor over the dense
data-parallel group (the job group every other partition is described over): the rank at (EP rank
``e``, EDP rank ``d``) holds, of row ``e``, the range partition ``d`` holds of that parameter, as
Megatron's :func:`~marsm_dist.adapters.megatron.tp_layout.expert_layout` does. The MARS-M group is
marked ``experts=True``, so MARSM splits it per EP rank: each global expert is its own matrix, owned
by a rank that holds (part of) it, and orthogonalized once in the whole job.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import groups as ds_groups
from torch import Tensor

from ..sharding.adapter import Slot
from ..sharding.layout import MatrixLayout, Piece, flat_overlap

__all__ = ["describe_moe_group", "expert_coordinates", "is_moe_group", "moe_flat_slots"]


def is_moe_group(group: dict[str, Any]) -> bool:
    """A MoE param group in DeepSpeed's sense (``deepspeed.moe.utils.is_moe_param_group``)."""
    return bool(group.get("moe", False))


def expert_coordinates(dense: dist.ProcessGroup, edp: dist.ProcessGroup, name: str,
                       device: torch.device) -> list[tuple[int, int]]:
    """(EP rank, EDP rank) of every rank of ``dense``, in group-rank order (a collective on ``dense``).

    ``edp``: this rank's expert-data-parallel group of the experts named ``name`` (ZeRO's partition
    index is the rank in it). Refused unless the ranks of ``dense`` are every (EP, EDP) pair once.
    """
    mine = torch.tensor([ds_groups._get_expert_parallel_rank(name), dist.get_rank(edp)], dtype=torch.int64,
                        device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(dense))]
    dist.all_gather(everyone, mine, group=dense)
    coords = [(ep, d) for ep, d in torch.stack(everyone).tolist()]  # one host read
    ep_size, edp_size = ds_groups._get_expert_parallel_world_size(name), dist.get_world_size(edp)
    grid = sorted((e, d) for e in range(ep_size) for d in range(edp_size))
    if sorted(coords) != grid:
        raise NotImplementedError(
            f"MARSM: the {name} experts' (expert-parallel, expert-data-parallel) ranks {coords} do not tile "
            f"the data-parallel group of {len(coords)} ranks as EP {ep_size} x EDP {edp_size}; DeepSpeed MoE "
            f"is supported where expert parallelism splits the data-parallel ranks (no pipeline/tensor "
            f"parallelism across them)")
    return coords


def moe_flat_slots(params: list[Tensor], offsets: list[int], partition_size: int,
                   coords: list[tuple[int, int]], me: int, names: dict[Tensor, str]) -> list[Slot]:
    """Slots of a MoE group's ZeRO-1/2 partition, over the dense group of ``coords``.

    EDP rank ``d`` holds ``[d * ps, (d + 1) * ps)`` of its EP rank's flat group buffer, where
    parameter ``k`` (a local expert's) occupies ``[offsets[k], offsets[k] + numel)``. Each parameter
    becomes the ``(EP, *shape)`` tensor of that local expert on every EP rank: the dense-group rank
    at (``e``, ``d``) holds of row ``e`` what partition ``d`` holds. ``me``: this rank in ``coords``.
    """
    ep_size = max(e for e, _ in coords) + 1
    slots = []
    for p, off in zip(params, offsets, strict=True):
        n, shape = p.numel(), (ep_size, *p.shape)
        pieces = []
        for e, d in coords:
            held = flat_overlap((off, off + n), (d * partition_size, (d + 1) * partition_size))
            pieces.append((Piece(0, e * n + held[0], e * n + held[1]),) if held else ())
        start = coords[me][1] * partition_size
        mine = sum(pc.numel for pc in pieces[me])
        name = names.get(p)
        slots.append(Slot(shape, MatrixLayout(shape, tuple(pieces)), max(off, start) - start if mine else 0,
                          mine, f"{name}@ep" if name else None))
    return slots


def describe_moe_group(group: dict[str, Any], params: list[Tensor], offsets: list[int], partition_size: int,
                       edp: dist.ProcessGroup, dense: dist.ProcessGroup, names: dict[Tensor, str],
                       ) -> tuple[list[Slot], dist.ProcessGroup] | None:
    """The slots and group of a MoE group's partition (and the group marked ``experts=True``), or
    None where the partition stays as it is: AdamW groups (elementwise: their EDP ranges serve)."""
    if group.get("use_marsm") is False or not params:
        return None
    coords = expert_coordinates(dense, edp, group["name"], params[0].device)
    group["experts"] = True  # dim 0 of every slot below is the EP rank: one matrix per global expert
    return moe_flat_slots(params, offsets, partition_size, coords, dist.get_rank(dense), names), dense
