"""DCP planners that write and read each rank's boxes of full tensors in place.

``torch.distributed.checkpoint`` (DCP) stores a tensor as chunks of its full shape and reshards
on load. Its own planners know DTensors and ShardedTensors; a ZeRO partition (any flat range) or
a Megatron column block is neither, so these planners take the boxes directly: one write item
per box (views of the rank's local elements, no copy) and, on load, the read items that fill this
rank's boxes from whatever chunks were saved. Replicas (DDP, HSDP) list identical boxes; DCP's
deduplication writes each once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner, create_default_global_load_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .boxes import Box

__all__ = ["BoxLoadPlanner", "BoxSavePlanner", "BoxedTensor"]


@dataclasses.dataclass
class BoxedTensor:
    """This rank's part of one full tensor: its boxes, over ``flat`` (the rank's elements, flat;
    or the whole tensor in its own shape and strides, one box)."""

    shape: tuple[int, ...]
    boxes: list[Box]
    flat: Tensor

    def view(self, k: int) -> Tensor:
        box = self.boxes[k]
        if self.flat.dim() != 1 or self.flat.shape == box.sizes:  # the whole tensor, any strides
            return self.flat.view(box.sizes) if self.flat.is_contiguous() else self.flat
        return self.flat[box.start:box.start + box.numel].view(box.sizes)

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes))
                for b in self.boxes]


class BoxSavePlanner(DefaultSavePlanner):
    """DCP's default save planner (deduplication, metadata, validation), plus the boxes of
    ``tensors`` (fqn -> :class:`BoxedTensor`) as shard write items."""

    def __init__(self, tensors: Mapping[str, BoxedTensor]) -> None:
        super().__init__(dedup_save_to_lowest_rank=True)
        self._tensors = tensors
        self._by_index: dict[MetadataIndex, Tensor] = {}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for fqn, part in self._tensors.items():
            properties = TensorProperties(dtype=part.flat.dtype)
            for k, chunk in enumerate(part.chunks()):
                index = MetadataIndex(fqn, chunk.offsets)
                self._by_index[index] = part.view(k)
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=chunk, properties=properties, size=torch.Size(part.shape))))
        self.plan = dataclasses.replace(plan, items=plan.items + items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        index = MetadataIndex(write_item.index.fqn, write_item.index.offset)
        if index in self._by_index:
            return self._by_index[index]
        return super().resolve_data(write_item)


class BoxLoadPlanner(LoadPlanner):
    """Reads the saved chunks that overlap this rank's boxes straight into them (views of the
    destination tensors: nothing is staged). Every fqn must be in the checkpoint (checked before)."""

    def __init__(self, tensors: Mapping[str, BoxedTensor]) -> None:
        self._tensors = tensors
        self.metadata: Metadata | None = None

    def set_up_planner(self, state_dict, metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        items: list[ReadItem] = []
        for fqn, part in self._tensors.items():
            stored = self.metadata.state_dict_metadata[fqn]
            items += create_read_items_for_chunk_list(fqn, stored, part.chunks())
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return create_default_global_load_plan(global_plan)

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:
        raise RuntimeError(f"unexpected non-tensor item {read_item.dest_index.fqn} in a box load")

    def resolve_tensor(self, read_item: ReadItem) -> Tensor:
        part = self._tensors[read_item.dest_index.fqn]
        view = part.view(read_item.dest_index.index)
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item: ReadItem, tensor: Tensor) -> None:
        pass  # the reader copied into a view of the destination
