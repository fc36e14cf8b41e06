"""The neutral checkpoint form refuses what it cannot load, naming the key, before it changes
anything: another optimizer's checkpoint, a different shape, a parameter on the other branch, a
missing or truncated data file, parameters nothing loads; and it round-trips exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from marsm_dist import MARSM, param_groups
from marsm_dist.checkpoint import MANIFEST, load_neutral, save_neutral
from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed


def _trained(model: nn.Module, **routing) -> MARSM:
    opt = MARSM(param_groups(model, named=True, **routing), lr=0.02, ns_dtype=torch.float32)
    for t in range(3):
        x, y = fm.batch("awkward", t)
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    return opt


def _snapshot(opt: MARSM) -> list:
    """The state in the optimizer's parameter order (``opt.state``'s order is first-step order)."""
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups for p in g["params"]]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
        for x, y in zip(a, b, strict=True))


@pytest.fixture
def saved(tmp_path) -> Path:
    save_neutral(_trained(fm.build("awkward")), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_the_state_round_trips_bitwise_and_names_come_from_the_model(tmp_path):
    model = fm.build("awkward")
    opt = _trained(model)
    manifest = save_neutral(opt, tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / MANIFEST).read_text()) == json.loads(json.dumps(manifest))
    twin = fm.build("awkward")
    # Bare tensors, one group each, in another order: names come from the model.
    routed = {n: n in ("a.weight", "b.weight", "c.weight") for n, _ in model.named_parameters()}
    by_name = dict(twin.named_parameters())
    bare = MARSM([{"params": [by_name[n]], "use_marsm": routed[n]} for n in reversed(routed)], lr=0.02)
    with pytest.warns(UserWarning, match="ns_dtype: 'float32' saved, 'bfloat16' here"):
        load_neutral(bare, tmp_path / "ckpt", model=twin)
    mine = dict(model.named_parameters())
    for name in routed:
        want, got = opt.state[mine[name]], bare.state[by_name[name]]
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_another_optimizers_checkpoint_is_refused(tmp_path, saved):
    model = fm.build("awkward")
    adamw = torch.optim.AdamW(model.parameters())
    model(*fm.batch("awkward", 0)).backward()
    adamw.step()
    dcp.save({"optim": adamw.state_dict()}, checkpoint_id=tmp_path / "adamw", no_dist=True)
    opt = _trained(fm.build("awkward"))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="no marsm_state.json"):
        load_neutral(opt, tmp_path / "adamw")
    assert _same(before, _snapshot(opt))


def test_a_different_shape_is_refused_naming_the_parameter(saved):
    model = fm.build("awkward")
    model.b, model.c = nn.Linear(30, 9), nn.Linear(9, 3, bias=False)  # (9, 30): the checkpoint has (7, 30)
    opt = _trained(model)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"'b.weight' has shape \(7, 30\) in the checkpoint, \(9, 30\) here"):
        load_neutral(opt, saved)
    assert _same(before, _snapshot(opt))


def test_a_parameter_on_the_other_branch_is_refused_naming_the_missing_key(saved):
    opt = _trained(fm.build("awkward"), marsm=["emb.weight"])  # saved on the AdamW branch
    before = _snapshot(opt)
    missing = r"'state.emb.weight.last_grad' is missing .*saved on the adamw branch"
    with pytest.raises(ValueError, match=missing):
        load_neutral(opt, saved)
    assert _same(before, _snapshot(opt))


def test_a_missing_or_truncated_data_file_is_refused_before_reading(saved):
    data = next(saved.glob("*.distcp"))
    opt = _trained(fm.build("awkward"))
    before = _snapshot(opt)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"state\.[a-z.]+\.[a-z_]+'.*short of .*damaged"):
        load_neutral(opt, saved)
    data.unlink()
    with pytest.raises(ValueError, match="is missing"):
        load_neutral(opt, saved)
    (saved / MANIFEST).unlink()  # an interrupted save: the manifest is written last
    with pytest.raises(ValueError, match="not a complete MARS-M neutral checkpoint"):
        load_neutral(opt, saved)
    assert _same(before, _snapshot(opt))


def test_parameters_nothing_loads_are_refused_unless_strict_is_off(saved):
    model = fm.build("awkward")
    opt = _trained(model)
    smaller = MARSM(param_groups(model, named=True)[:1], lr=0.02, ns_dtype=torch.float32)  # MARS-M only
    with pytest.raises(ValueError, match="'head.bias' of the checkpoint is not in this optimizer"):
        load_neutral(smaller, saved)
    load_neutral(smaller, saved, strict=False)
    assert all(smaller.state[p]["step"] == 3 for p in smaller.param_groups[0]["params"])
    renamed = MARSM(param_groups(copy.deepcopy(model), named=True), lr=0.02)
    with pytest.raises(ValueError, match="no state for parameter 'x.a.weight'"):
        load_neutral(renamed, saved, name_map=lambda n: "x." + n)
    del opt


def _refused_on_every_rank(rank, world_size, path):
    model = fm.build("awkward")
    model.c = nn.Linear(7, 4, bias=False)
    fm.shard(model, world_size)
    opt = MARSM(param_groups(model), lr=0.02)
    opt.init_state()
    try:
        load_neutral(opt, path, model=model)
    except ValueError as err:
        return str(err)
    return None


def test_every_rank_refuses_together(saved):
    errors = run_distributed(_refused_on_every_rank, 2, str(saved))
    assert all(e is not None and "'c.weight' has shape (3, 7)" in e for e in errors)


def test_master_weights_round_trip_and_are_refused_when_not_saved(tmp_path, saved):
    model = fm.build("awkward")
    opt = _trained(model)
    save_neutral(opt, tmp_path / "with", weights=True)
    twin = fm.build("awkward")
    twin_opt = MARSM(param_groups(twin, named=True), lr=0.02, ns_dtype=torch.float32)
    load_neutral(twin_opt, tmp_path / "with", weights=True)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="saved without weights"):
        load_neutral(twin_opt, saved, weights=True)


def test_names_drop_wrapper_levels_but_keep_a_models_own_module():
    from marsm_dist.checkpoint.held import strip_wrappers

    assert strip_wrappers("module.module.decoder.layers.0.w") == "decoder.layers.0.w"  # DDP, Megatron
    assert strip_wrappers("_orig_mod.layers.0._checkpoint_wrapped_module.w") == "layers.0.w"
    assert strip_wrappers("adapter.module.weight") == "adapter.module.weight"  # the model's own


def test_channels_last_and_empty_parameters_round_trip(tmp_path):
    """A whole tensor with its own strides (a channels_last convolution) is one box read and
    written through them; an empty parameter writes nothing and loads as nothing."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.Linear(4, 0))
        return model.to(memory_format=torch.channels_last)

    model = build()
    opt = MARSM(param_groups(model, named=True), lr=0.01)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert not opt.state[model[0].weight]["exp_avg"].is_contiguous()  # the case under test
    save_neutral(opt, tmp_path / "ckpt", weights=True)
    twin = build()
    twin_opt = MARSM(param_groups(twin, named=True), lr=0.01)
    load_neutral(twin_opt, tmp_path / "ckpt", weights=True)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(torch.as_tensor(opt.state[p][k]), torch.as_tensor(twin_opt.state[q][k]))
                   for k in opt.state[p])
