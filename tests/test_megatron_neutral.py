"""Megatron-core runs move through the neutral checkpoint form: MARS-M's state saved at one
TP x DP split with or without the distributed optimizer continues at another (the weights through
Megatron's own dist-checkpointing), equal to the uninterrupted run. The names are the model's
(``module.`` dropped), so the same checkpoint loads under FSDP2 or DeepSpeed given matching names;
``name_map`` renames where another framework's differ."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from marsm_dist.checkpoint import load_neutral, save_neutral  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402
from tests.helpers.megatron_gpt import full_params, setup  # noqa: E402
from tests.test_megatron_checkpoint import build, train  # noqa: E402

pytestmark = pytest.mark.distributed


def move(rank, world_size, path, tp, load_tp, distributed, load_distributed, bf16=False, weights=False):
    from megatron.core import dist_checkpointing

    ps = setup(tp, fake_cuda_type=True)
    ddp, opt = build(tp, distributed, bf16=bf16)
    train(ddp, opt, ps, 4, 0)
    dist_checkpointing.save({"model": ddp.module.sharded_state_dict()}, f"{path}/model")
    manifest = save_neutral(opt, f"{path}/optim", model=ddp.module, name_map=lambda n: f"gpt.{n}",
                            weights=weights)
    train(ddp, opt, ps, 4, 4)
    want = full_params(ddp, ps)
    ps.destroy_model_parallel()
    ps = setup(load_tp, fake_cuda_type=True)
    torch.manual_seed(99)  # everything must come from the checkpoint
    ddp, opt = build(load_tp, load_distributed, bf16=bf16)
    loaded = dist_checkpointing.load({"model": ddp.module.sharded_state_dict()}, f"{path}/model")
    ddp.module.load_state_dict(loaded["model"])
    opt.reload_model_params()  # the distributed optimizer's fp32 main shards follow the loaded weights
    load_neutral(opt, f"{path}/optim", model=ddp.module, name_map=lambda n: f"gpt.{n}", weights=weights)
    train(ddp, opt, ps, 4, 4)
    got = full_params(ddp, ps)
    return max((got[n].float() - want[n].float()).abs().max().item() for n in want), manifest["params"]


@pytest.mark.parametrize(("tp", "load_tp", "distributed", "load_distributed"),
                         [(2, 1, True, False), (1, 2, False, True)],
                         ids=["tp2-distopt-to-tp1", "tp1-to-tp2-distopt"])
def test_a_megatron_run_continues_at_another_split(tmp_path, tp, load_tp, distributed, load_distributed):
    (tmp_path / "model").mkdir()
    results = run_distributed(move, 2, str(tmp_path), tp, load_tp, distributed, load_distributed, timeout=300)
    for diff, params in results:
        assert diff < 1e-5
        # full logical shapes on both branches, whatever the split (the embedding is vocab-parallel)
        assert params["gpt.embedding.word_embeddings.weight"]["shape"] == [64, 32]
        assert params["gpt.embedding.word_embeddings.weight"]["branch"] == "adamw"
        assert params["gpt.decoder.layers.0.mlp.linear_fc1.weight"]["branch"] == "marsm"


@pytest.mark.parametrize("distributed", [False, True], ids=["float16-wrapper", "distributed-optimizer"])
def test_bf16_master_weights_travel_with_weights_true(tmp_path, distributed):
    """bf16: the model's weights round the fp32 mains; weights=True carries the mains, and the run
    continues bitwise (the same split). Without them it does not: the control."""
    (tmp_path / "a" / "model").mkdir(parents=True)
    (tmp_path / "b" / "model").mkdir(parents=True)
    same = (2, 2, distributed, distributed, True)  # TP2 -> TP2, bf16
    exact = run_distributed(move, 2, str(tmp_path / "a"), *same, True, timeout=300)
    rounded = run_distributed(move, 2, str(tmp_path / "b"), *same, False, timeout=300)
    assert all(diff == 0.0 for diff, _ in exact)
    assert all(diff > 1e-3 for diff, _ in rounded)
