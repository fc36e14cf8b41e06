"""The sharding adapter for Megatron's parameters under the replicated (non-distributed) optimizer.

Tensor-parallel weights take :func:`~.tp_layout.tp_layout` over the TP x DP group (one TP block per
rank, one copy per DP rank). Expert-parallel (MoE) weights differ between DP ranks: each rank
orthogonalizes its own (expert TP size 1 only). A fused QKV weight marked by :func:`mark_qkv_split`
is cut into the Q, K and V rows of every query group, each its own matrix (each TP rank holds whole
query groups, so no exchange is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor

from ...sharding.adapter import SideTableAdapter, Slot, register_adapter
from ...sharding.layout import MatrixLayout
from .tp_layout import coordinates, tensor_and_data_parallel_group, tp_layout

__all__ = ["MegatronTPAdapter", "is_expert_parallel", "mark_expert_mains", "mark_qkv_split"]


@dataclass(frozen=True)
class _Marks:
    """What the builder told the adapter about one tensor."""

    expert_main: bool = False  # the fp32 master copy of an expert-parallel weight
    qkv_split: tuple[int, int] | None = None  # a fused QKV weight: (heads per query group, head dim)


class MegatronTPAdapter(SideTableAdapter):
    """Megatron's parameters held over the tensor-and-data-parallel group: tensor-parallel weights
    (one TP block per rank, one copy per DP rank) and expert-parallel ones (each rank's own)."""

    name = "megatron"
    prepopulate_state = False  # Megatron calls init_state_fn when it needs state templates

    def handles(self, p: Tensor) -> bool:
        # Not every registered tensor: a QKV mark splits a TP weight, it does not claim one.
        return bool(getattr(p, "tensor_model_parallel", False)) or is_expert_parallel(p)

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        return tensor_and_data_parallel_group()

    def replica_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The DP group: the ranks with this rank's TP rank, one per copy."""
        group = parallel_state.get_data_parallel_group()
        return group if dist.get_world_size(group) > 1 else None

    def layout(self, p: Tensor) -> MatrixLayout:
        group = tensor_and_data_parallel_group()
        if group is None:
            return super().layout(p)
        coords = coordinates(group, p.device)
        return tp_layout(p, coords, parallel_state.get_tensor_model_parallel_world_size())

    def slots(self, p: Tensor) -> list[Slot]:
        if is_expert_parallel(p):
            # Each expert-parallel rank holds other experts: no copies to share the work with.
            if p.ndim >= 2 and parallel_state.get_expert_tensor_parallel_world_size() > 1:
                raise NotImplementedError("MARSM does not support expert tensor parallelism (an expert "
                                          "weight split over ranks) yet; use expert TP size 1")
            return [Slot(tuple(p.shape))]
        marks = self.info(p)
        if marks is None or marks.qkv_split is None:
            return super().slots(p)
        heads_per_group, head_dim = marks.qkv_split
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
    master copy of one (Megatron's ``Float16OptimizerWithFloat16Params`` does not copy the mark)."""
    if getattr(p, "allreduce", True) is False:
        return True
    marks = ADAPTER.info(p)
    return marks is not None and marks.expert_main


def mark_expert_mains(params: list[Tensor], mains: list[Tensor]) -> None:
    """Mark the fp32 master copies (``mains``) of the expert-parallel ones among ``params``."""
    for p, main in zip(params, mains, strict=True):
        if is_expert_parallel(p):
            ADAPTER.register(main, _Marks(expert_main=True))


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


register_adapter(ADAPTER)
