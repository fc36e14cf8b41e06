"""The sharding adapter for Megatron's parameters under the replicated (non-distributed) optimizer.

Every layout is described over the job group (:func:`~.tp_layout.job_group`: TP x DP, with CP when
CP > 1), so each matrix is orthogonalized once in the whole job. Tensor-parallel weights take
:func:`~.tp_layout.tp_layout` (one TP block per rank, a copy per DP x CP rank; results reach the
other copies over the DP x CP group). Expert-parallel (MoE) weights the builder put in an
``experts=True`` group (:func:`mark_experts`) take :func:`~.tp_layout.expert_layout`: local expert
``i`` of every EP rank is one ``(EP, *expert)`` slot, split per expert by the optimizer (each
global expert its own matrix, owned by a rank that holds it, results broadcast over Megatron's
expert-data-parallel group); its name is the local tensor's with ``@ep``, so ``name@ep[e]`` is global
expert ``e * local experts + i``. Expert weights that were not marked (a MARSM built without the
builder) stay each rank's own tensor (expert TP size 1 only). A fused QKV weight marked by
:func:`mark_qkv_split` is cut into the Q, K and V rows of every query group, each its own matrix
(each TP rank holds whole query groups, so no exchange is needed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from ...sharding.adapter import SideTableAdapter, Slot, register_adapter
from ...sharding.layout import MatrixLayout
from .tp_layout import copies_group, expert_layout, job_group, rank_coordinates, tp_layout

__all__ = ["MegatronTPAdapter", "is_expert_parallel", "mark_experts", "mark_mains", "mark_qkv_split",
           "register"]

#: Below the DP-shard (40) and DeepSpeed (30) adapters, whose tensors may carry Megatron's marks too,
#: above FSDP2 (10): see marsm_dist.sharding.adapter.
PRIORITY = 20


@dataclass(frozen=True)
class _Marks:
    """What the builder told the adapter about one tensor."""

    expert_main: bool = False  # the fp32 master copy of an expert-parallel weight
    qkv_split: tuple[int, int] | None = None  # a fused QKV weight: (heads per query group, head dim)
    experts: str | None = None  # in an experts=True group, described per expert: its name


class MegatronTPAdapter(SideTableAdapter):
    """Megatron's parameters held over the job group: tensor-parallel weights (one TP block per
    rank, a copy per DP x CP rank) and expert-parallel ones (per expert, a copy per EDP rank)."""

    name = "megatron"
    prepopulate_state = False  # Megatron calls init_state_fn when it needs state templates

    def handles(self, p: Tensor) -> bool:
        # Not every registered tensor: a QKV mark splits a TP weight, it does not claim one.
        return bool(getattr(p, "tensor_model_parallel", False)) or is_expert_parallel(p)

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        return job_group()

    def _experts(self, p: Tensor) -> str | None:
        marks = self.info(p)
        return marks.experts if marks is not None and is_expert_parallel(p) else None

    def replica_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The ranks with this rank's pieces, one per copy: DP (x CP), or EDP for experts."""
        group = parallel_state.get_expert_data_parallel_group() if self._experts(p) else copies_group()
        return group if dist.get_world_size(group) > 1 else None

    def layout(self, p: Tensor) -> MatrixLayout:
        group = job_group()
        if group is None:
            return super().layout(p)
        coords = rank_coordinates(group, p.device)
        if self._experts(p):
            return expert_layout(p, coords, parallel_state.get_expert_tensor_parallel_world_size())
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        return tp_layout(p, [(c.tp, c.dp) for c in coords], tp_size)

    def slots(self, p: Tensor) -> list[Slot]:
        etp = parallel_state.get_expert_tensor_parallel_world_size()
        name = self._experts(p)
        if name is not None:
            if p.ndim >= 2 and etp > 1 and not getattr(p, "tensor_model_parallel", False):
                raise NotImplementedError(f"{name}: an expert matrix that is not tensor-parallel but "
                                          f"replicated over {etp} expert-TP ranks is not supported")
            if job_group() is None:
                return [Slot((1, *p.shape), None, 0, -1, f"{name}@ep")]
            layout = self.layout(p)
            return [Slot(layout.shape, layout, 0, -1, f"{name}@ep")]
        if is_expert_parallel(p):
            # Not in an experts group (MARSM built without get_megatron_marsm_optimizer): its own.
            if p.ndim >= 2 and etp > 1:
                raise NotImplementedError("MARSM supports expert tensor parallelism (an expert weight split "
                                          "over ranks) through get_megatron_marsm_optimizer only, which puts "
                                          "expert weights in experts=True param groups; use expert TP size 1")
            return [Slot(tuple(p.shape))]
        marks = self.info(p)
        if marks is None or marks.qkv_split is None:
            return super().slots(p)
        return _qkv_slots(p, *marks.qkv_split)


def _qkv_slots(p: Tensor, heads_per_group: int, head_dim: int) -> list[Slot]:
    """The Q, K and V rows of every local query group of fused QKV weight ``p``, each a slot."""
    cols = p.shape[1]
    rows = [heads_per_group * head_dim, head_dim, head_dim]  # Q, K, V of one query group
    groups = p.shape[0] // sum(rows)
    slots, row = [], 0
    for g in range(groups):
        for kind, n in zip("QKV", rows, strict=True):
            slots.append(Slot((n, cols), None, row * cols, n * cols, f"{kind} of local query group {g}"))
            row += n
    return slots


ADAPTER = MegatronTPAdapter()


def is_expert_parallel(p: Tensor) -> bool:
    """Megatron's mark of an expert-parallel (MoE) weight (not all-reduced over DP), or the fp32
    master copy of one (Megatron's ``Float16OptimizerWithFloat16Params`` does not copy the mark).
    Only while Megatron's parallel state is initialized: DeepSpeed's MoE experts carry the same
    ``allreduce=False`` (and a ``group_name``), and must stay with the DeepSpeed adapter."""
    if getattr(p, "allreduce", True) is False:
        return parallel_state.model_parallel_is_initialized() and not hasattr(p, "group_name")
    marks = ADAPTER.info(p)
    return marks is not None and marks.expert_main


def mark_experts(model_chunks: list[torch.nn.Module], groups: list[dict[str, Any]]) -> None:
    """Describe the expert-parallel tensors of ``experts=True`` groups per expert over the job group."""
    names = {p: n.removeprefix("module.") for chunk in model_chunks for n, p in chunk.named_parameters()}
    for group in groups:
        for p in group["params"] if group.get("experts") else ():
            if is_expert_parallel(p):
                name = names.get(p, "an expert tensor")
                ADAPTER.register(p, replace(ADAPTER.info(p) or _Marks(), experts=name))


def mark_mains(params: list[Tensor], mains: list[Tensor]) -> None:
    """Give the fp32 master copies (``mains``) of ``params`` what was registered for their parameter
    (a QKV split, a place in an experts group), and the expert mark Megatron does not copy."""
    for p, main in zip(params, mains, strict=True):
        marks = ADAPTER.info(p)
        if is_expert_parallel(p):
            ADAPTER.register(main, replace(marks or _Marks(), expert_main=True))
        elif marks is not None:
            ADAPTER.register(main, marks)


def mark_qkv_split(model_chunks: list[torch.nn.Module]) -> None:
    """Orthogonalize the Q, K and V rows of every query group of the chunks' fused QKV weights apart."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        cfg = getattr(chunk, "config", None) or chunk.module.config
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups % tp:
            raise NotImplementedError(f"split_qkv needs num_query_groups ({groups}) divisible by the "
                                      f"tensor-parallel size ({tp}): a TP rank must hold whole groups")
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        for name, p in chunk.named_parameters():
            if name.endswith("linear_qkv.weight"):
                ADAPTER.register(p, _Marks(qkv_split=(cfg.num_attention_heads // groups, head_dim)))


def register() -> None:
    """Register the TP adapter (idempotent). The builder calls it; the registry does too, at a
    lookup once ``megatron.core`` is imported, for a ``MARSM`` built on Megatron's tensors directly."""
    register_adapter(ADAPTER, priority=PRIORITY)
