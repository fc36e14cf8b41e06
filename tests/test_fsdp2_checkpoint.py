"""torch.distributed.checkpoint with get/set_optimizer_state_dict: save at W=4, load at W=2 and
W=3, and the run continues the single-process trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed
KW = dict(ns_dtype=torch.float32)


def save_run(rank, world_size, path, approx):
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, approx=approx, **KW)
    # State exists before the first step (no dummy step inside the checkpoint helpers), with the
    # same keys on every rank, each per-element tensor a DTensor like its parameter.
    keys = {k for st in opt.state.values() for k in st}
    fm.train("awkward", model, opt, 5, approx=approx, rank=rank, world_size=world_size)
    osd = get_optimizer_state_dict(model, opt)
    placements = {(n, k): (type(v).__name__, getattr(v, "placements", None))
                  for n, st in osd["state"].items() for k, v in st.items()}
    dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=path)
    return keys, placements


def load_run(rank, world_size, path, approx):
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, approx=approx, **KW)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, optim_state_dict=state["optim"])
    for p, st in opt.state.items():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                assert isinstance(v, DTensor) and v.placements == p.placements, k
                assert v.dtype == p.dtype, k
    fm.train("awkward", model, opt, 5, approx=approx, rank=rank, world_size=world_size, start=5)
    return fm.full_params(model)


@pytest.mark.parametrize("approx", [True, False], ids=["approx", "exact"])
def test_save_at_four_ranks_resume_at_two_and_three(tmp_path, approx):
    saved = run_distributed(save_run, 4, str(tmp_path / "ckpt"), approx)
    keys = {frozenset(k) for k, _ in saved}
    assert len(keys) == 1  # rank-symmetric
    expected = {"step", "exp_avg", "last_grad", "exp_avg_sq"} | (
        set() if approx else {"lookahead_grad", "lookahead_ready"})
    assert set(next(iter(keys))) == expected
    for (n, k), (kind, placements) in saved[0][1].items():
        if k not in ("step", "lookahead_ready"):
            assert kind == "DTensor" and "Shard(dim=0)" in str(placements), (n, k)
    want = fm.reference("awkward", 10, approx=approx, **KW)
    for world_size in (2, 3):
        got = run_distributed(load_run, world_size, str(tmp_path / "ckpt"), approx)[0]
        for n in want:
            assert (got[n] - want[n]).abs().max() < 1e-5, (world_size, n)


def save_fsdp_x_tp_run(rank, world_size, path):
    model, dp_rank, dp_size = fm.shard_fsdp_x_tp(fm.build("awkward"))
    opt = fm.make_opt(model, **KW)
    fm.train("awkward", model, opt, 5, approx=True, rank=dp_rank, world_size=dp_size)
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)
    return {n: str(p.placements) for n, p in model.named_parameters()}


def test_save_fsdp_x_tp_resume_on_a_1d_mesh(tmp_path):
    """Saved on a 2x2 FSDP x TP mesh (2-D state DTensors, _StridedShard and uneven blocks), loaded
    into 1-D FSDP2 at 2 and 4 ranks: the run continues the single-process trajectory."""
    placements = run_distributed(save_fsdp_x_tp_run, 4, str(tmp_path / "ckpt"))[0]
    assert "_StridedShard" in placements["a.weight"] and "Shard(dim=1)" in placements["b.weight"]
    want = fm.reference("awkward", 10, approx=True, **KW)
    for world_size in (2, 4):
        got = run_distributed(load_run, world_size, str(tmp_path / "ckpt"), True)[0]
        for n in want:
            assert (got[n] - want[n]).abs().max() < 1e-5, (world_size, n)


HELPER_OPTIONS = {  # save options -> load options (full + cpu_offload leaves ranks > 0 empty)
    "sharded": ({}, {}),
    "cpu_offload": ({"cpu_offload": True}, {"cpu_offload": True}),
    "full": ({"full_state_dict": True}, {"full_state_dict": True}),
    "full_broadcast": ({"full_state_dict": True}, {"full_state_dict": True, "broadcast_from_rank0": True}),
    "full_cpu_offload": ({"full_state_dict": True, "cpu_offload": True},
                         {"full_state_dict": True, "broadcast_from_rank0": True}),
}


def helper_round_trip_run(rank, world_size, case):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    save, load = (StateDictOptions(**o) for o in HELPER_OPTIONS[case])
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, **KW)
    fm.train("awkward", model, opt, 4, approx=True, rank=rank, world_size=world_size)
    # A copy stands for the trip through storage: unserialized, the sharded state dict holds the
    # live state tensors, which load_state_dict would share between the two optimizers.
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt, options=save))
    plain = all(not isinstance(v, torch.dtype) for g in osd.get("param_groups", []) for v in g.values())
    model2 = fm.shard(fm.build("awkward"), world_size)
    set_model_state_dict(model2, get_model_state_dict(model))
    opt2 = fm.make_opt(model2, lr=0.5, **KW)  # the group values come from the state dict
    set_optimizer_state_dict(model2, opt2, optim_state_dict=osd, options=load)
    group = opt2.param_groups[0]
    types = (type(group["adamw_betas"]), type(group["ns_coefficients"]), group["ns_dtype"], group["lr"])
    for m, o in ((model, opt), (model2, opt2)):
        fm.train("awkward", m, o, 4, approx=True, rank=rank, world_size=world_size, start=4)
    return plain, types, fm.full_params(model), fm.full_params(model2)


@pytest.mark.parametrize("case", list(HELPER_OPTIONS))
def test_torch_state_dict_helpers_round_trip_with_every_option(case):
    """get/set_optimizer_state_dict as HF Accelerate and Lightning call them: the group values
    are plain (no torch.dtype), they come back with their types, and the resumed run equals the
    uninterrupted one bit for bit."""
    for plain, types, uninterrupted, resumed in run_distributed(helper_round_trip_run, 2, case):
        assert plain
        assert types == (tuple, tuple, torch.float32, 0.02)
        for n in uninterrupted:
            assert torch.equal(uninterrupted[n], resumed[n]), n


def swapped_run(rank, world_size):
    """accelerate's FSDP2 prepare: the optimizer is built on the plain model, then the model is
    sharded and the optimizer's groups get the new DTensor parameters in place of the old ones."""
    model = fm.build("awkward")
    opt = fm.make_opt(model, **KW)
    names = {id(p): n for n, p in model.named_parameters()}
    old_groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    fm.shard(model, world_size)
    new = dict(model.named_parameters())
    for group, old in zip(opt.param_groups, old_groups, strict=True):
        group["params"] = [new[n] for n in old]
    fm.train("awkward", model, opt, 10, approx=True, rank=rank, world_size=world_size)
    keys = sorted((names_k, tuple(sorted(st))) for names_k, st in
                  ((n, opt.state[new[n]]) for n in new))
    return keys, fm.full_params(model)


def test_parameters_swapped_in_after_construction_train_and_keep_symmetric_state():
    results = run_distributed(swapped_run, 2)
    assert results[0][0] == results[1][0]  # the same state keys on both ranks, for every parameter
    assert all(len(k[1]) >= 3 for k in results[0][0])
    want = fm.reference("awkward", 10, approx=True, **KW)
    for _, got in results:
        for n in want:
            assert (got[n] - want[n]).abs().max() < 1e-5, n
