"""The distributed MARS-M optimizer's checkpoint pieces, without processes: a rank's flat range of a
parameter's state, cut into boxes of the parameter's global tensor, must put every element where
the non-distributed optimizer's param-shaped state puts it, once, as views of the rank's state."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory  # noqa: E402

from marsm_dist.adapters.megatron import flat_range_boxes, flat_range_pieces  # noqa: E402

PREFIX = "optimizer.state.exp_avg"


def test_boxes_are_the_flat_range_in_order():
    rng = random.Random(0)
    for shape in [(7,), (4, 5), (3, 1, 4), (2, 3, 4, 2), (1, 6)]:
        numel = math.prod(shape)
        for _ in range(40):
            start, stop = sorted(rng.randrange(numel + 1) for _ in range(2))
            boxes = flat_range_boxes(shape, start, stop)
            assert len(boxes) <= 2 * len(shape) - 1
            flat = torch.arange(numel).view(shape)
            got = [flat[tuple(slice(o, o + z) for o, z in zip(off, size, strict=True))].reshape(-1)
                   for off, size in boxes]
            assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long),
                               torch.arange(start, stop)), (shape, start, stop, boxes)


def place(pieces, out: dict[str, torch.Tensor], count: dict[str, torch.Tensor]) -> None:
    for p in pieces:
        if p.key not in out:
            out[p.key] = torch.full(p.global_shape, float("nan"))
            count[p.key] = torch.zeros(p.global_shape, dtype=torch.int)
        where = tuple(itertools.chain(p.global_offset[:p.prepend_axis_num],
                                      (slice(o, o + z) for o, z in zip(p.global_offset[p.prepend_axis_num:],
                                                                       p.local_shape, strict=True))))
        out[p.key][where] = p.data.view(out[p.key][where].shape)
        count[p.key][where] += 1


def reference(entry, local: torch.Tensor) -> list[ShardedTensor]:
    """What the non-distributed optimizer hands Megatron: the whole local tensor under the entry."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        return list(nested_values(replace(entry, key=f"{PREFIX}.{entry.key}", data=local).build()))
    return [replace(entry, key=f"{PREFIX}.{entry.key}", data=local)]


def entries():
    """A TP-split matrix of layer 1 of 3 (a prepended layer axis), a 1-D norm weight replicated over TP,
    and SwiGLU's fc1 (a factory: the local tensor's two halves go to two places of the global one)."""
    matrix = torch.zeros(6, 5)
    yield ShardedTensor.from_rank_offsets("decoder.layers.linear_qkv.weight", matrix, (0, 1, 3), (1, 1, 2),
                                          replica_id=(0, 0, 1), prepend_axis_num=1)
    yield ShardedTensor.from_rank_offsets("decoder.final_layernorm.weight", torch.zeros(11),
                                          replica_id=(0, 0, 1))
    fc1 = torch.zeros(8, 5)
    original = ShardedTensor.from_rank_offsets("decoder.layers.mlp.linear_fc1.weight", fc1, (0, 1, 3),
                                               (1, 1, 2), replica_id=(0, 0, 1), prepend_axis_num=1)
    yield apply_swiglu_sharded_factory(original, ((0, 1, 3),))


@pytest.mark.parametrize("entry", list(entries()), ids=["tp-matrix", "norm", "swiglu-fc1"])
@pytest.mark.parametrize("cuts", [(), (7,), (5, 10, 33), (1, 2, 3, 20, 39)], ids=lambda c: f"cuts{list(c)}")
def test_rank_ranges_rebuild_the_param_shaped_state(entry, cuts):
    local = torch.randn(entry.data.shape)
    numel = local.numel()
    want, want_count = {}, {}
    place(reference(entry, local), want, want_count)
    got, got_count = {}, {}
    bounds = [0, *[c for c in cuts if c < numel], numel]
    for start, stop in itertools.pairwise(bounds):  # one DP rank each
        state = local.view(-1)[start:stop].clone()
        pieces = flat_range_pieces(entry, state, start, stop, PREFIX)
        for p in pieces:
            assert p.data.untyped_storage().data_ptr() == state.untyped_storage().data_ptr()  # a view
            assert p.replica_id == (0, 0, 0)  # each DP rank writes its own range: no DP replicas
            p.validate_metadata_integrity()
        assert torch.equal(torch.cat([p.data.reshape(-1) for p in pieces]), state)  # in the state's order
        place(pieces, got, got_count)
    assert got.keys() == want.keys()
    for key in want:
        written = want_count[key] > 0
        assert torch.equal(got_count[key], want_count[key]), key  # every element once, nothing else
        assert torch.equal(got[key][written], want[key][written]), key


def test_replicas_over_tp_are_left_out_of_what_is_written():
    norm = ShardedTensor.from_rank_offsets("decoder.final_layernorm.weight", torch.zeros(11),
                                           replica_id=(0, 1, 0))  # TP rank 1's copy
    state = torch.randn(5)
    assert flat_range_pieces(norm, state, 3, 8, PREFIX, keep_replicas=False) == []
    assert len(flat_range_pieces(norm, state, 3, 8, PREFIX)) == 1  # but loaded into, like the others
