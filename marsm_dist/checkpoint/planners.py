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
from collections.abc import Callable, Mapping

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

__all__ = ["BoxLoadPlanner", "BoxSavePlanner", "BoxedTensor", "LoaderSavePlanner"]


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
        items = []
        for fqn, part in self._tensors.items():
            for k, chunk in enumerate(part.chunks()):
                item = _write_item(fqn, chunk, part.flat.dtype, part.shape, WriteItemType.SHARD)
                self._by_index[item.index] = part.view(k)
                items.append(item)
        return _with_items(self, items)

    def resolve_data(self, write_item: WriteItem):
        index = MetadataIndex(write_item.index.fqn, write_item.index.offset)
        if index in self._by_index:
            return self._by_index[index]
        return super().resolve_data(write_item)


class LoaderSavePlanner(DefaultSavePlanner):
    """Writes each ``fqn -> (shape, dtype, loader)`` as one full tensor, calling the loader when
    DCP's writer gets to it (one at a time, on the CPU) and checking the shape it returns."""

    def __init__(self, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype, Callable[[], Tensor]]]):
        super().__init__()
        self._tensors = tensors

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, (shape, dtype, _) in self._tensors.items():
            whole = ChunkStorageMetadata(offsets=torch.Size([0] * len(shape)), sizes=torch.Size(shape))
            items.append(_write_item(fqn, whole, dtype, shape, WriteItemType.TENSOR))
        return _with_items(self, items)

    def resolve_data(self, write_item: WriteItem):
        shape, _, load = self._tensors[write_item.index.fqn]
        tensor = load()
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{write_item.index.fqn!r} has shape {tuple(tensor.shape)}, its parameter "
                             f"{shape}")
        return tensor


def _write_item(fqn: str, chunk: ChunkStorageMetadata, dtype: torch.dtype, shape: tuple[int, ...],
                kind: WriteItemType) -> WriteItem:
    """DCP's write item for ``chunk`` of the full tensor ``fqn`` of ``shape``."""
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=dtype), size=torch.Size(shape))
    return WriteItem(index=MetadataIndex(fqn, chunk.offsets), type=kind, tensor_data=data)


def _with_items(planner: DefaultSavePlanner, items: list[WriteItem]) -> SavePlan:
    """DCP's default local plan (for the planner's plain state dict) with ``items`` added."""
    plan = DefaultSavePlanner.create_local_plan(planner)
    planner.plan = dataclasses.replace(plan, items=plan.items + items)
    return planner.plan


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
