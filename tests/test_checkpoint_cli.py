"""``python -m marsm_dist.checkpoint``: inspect and convert the layouts torch-based frameworks write
(DCP of ``get_optimizer_state_dict``, as FSDP2, torchtitan and Accelerate save it; a
``torch.save``-d state dict with names, as DDP and the HF Trainer's ``optimizer.pt``) to the
neutral form, which then loads into a fresh optimizer bitwise; another optimizer's state, a damaged
source and an existing destination are refused with nothing written."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

from marsm_dist import MARSM, param_groups
from marsm_dist.checkpoint import load_neutral
from marsm_dist.checkpoint.cli import main
from tests.helpers import fsdp2_models as fm

ROOT = Path(__file__).resolve().parents[1]


def _trained(approx: bool = True) -> tuple[torch.nn.Module, MARSM]:
    model = fm.build("awkward")
    opt = MARSM(param_groups(model, named=True), lr=0.02, ns_dtype=torch.float32, approx=approx)
    for t in range(3):
        if not approx:
            model(*fm.batch("awkward", t + 1)).backward()
            opt.store_lookahead_grad()
            opt.zero_grad()
        model(*fm.batch("awkward", t)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _same_state(model, opt, twin_model, twin_opt) -> None:
    theirs = dict(twin_model.named_parameters())
    for name, p in model.named_parameters():
        want, got = opt.state[p], twin_opt.state[theirs[name]]
        assert want.keys() == got.keys(), name
        for k in want:
            assert torch.equal(torch.as_tensor(want[k]), torch.as_tensor(got[k])), (name, k)


def _fresh() -> tuple[torch.nn.Module, MARSM]:
    model = fm.build("awkward")
    return model, MARSM(param_groups(model, named=True), lr=0.02, ns_dtype=torch.float32)


@pytest.mark.parametrize("layout", ["dcp", "dcp-flat", "torch"])
def test_a_frameworks_own_layout_converts_and_loads_bitwise(tmp_path, layout, capsys):
    model, opt = _trained()
    src = tmp_path / "src"
    if layout.startswith("dcp"):  # as FSDP2 and Accelerate save it; flattened, as torchtitan does
        options = StateDictOptions(flatten_optimizer_state_dict=layout == "dcp-flat")
        state = {"optim": get_optimizer_state_dict(model, opt, options=options)}
        dcp.save(state, checkpoint_id=src, no_dist=True)
    else:  # as the HF Trainer saves optimizer.pt
        torch.save(opt.state_dict(), src)
    assert main(["convert", str(src), str(tmp_path / "neutral"), "--to", "neutral", "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "neutral"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["format"] == "neutral" and info["steps"] == [3.0] and info["parameters"] == 10
    assert {p["name"]: p["branch"] for p in info["params"]}["b.weight"] == "marsm"
    twin_model, twin_opt = _fresh()
    load_neutral(twin_opt, tmp_path / "neutral")
    _same_state(model, opt, twin_model, twin_opt)


def test_the_exact_modes_lookahead_travels(tmp_path):
    model, opt = _trained(approx=False)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    args = ["convert", str(tmp_path / "optimizer.pt"), str(tmp_path / "n"), "--to", "neutral", "--quiet"]
    assert main(args) == 0
    twin_model = fm.build("awkward")
    twin = MARSM(param_groups(twin_model, named=True), lr=0.02, ns_dtype=torch.float32, approx=False)
    load_neutral(twin, tmp_path / "n")
    _same_state(model, opt, twin_model, twin)


def test_another_optimizers_state_is_refused_and_nothing_is_written(tmp_path, capsys):
    model = fm.build("awkward")
    adamw = torch.optim.AdamW(model.parameters())
    model(*fm.batch("awkward", 0)).backward()
    adamw.step()
    state = {"optim": get_optimizer_state_dict(model, adamw)}
    dcp.save(state, checkpoint_id=tmp_path / "adamw", no_dist=True)
    assert main(["convert", str(tmp_path / "adamw"), str(tmp_path / "out"), "--to", "neutral"]) == 2
    err = capsys.readouterr().err
    assert "another optimizer's state" in err and "'gamma'" in err and "param_groups of 'emb.weight'" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_missing_state_key_and_an_existing_destination_are_refused(tmp_path, capsys):
    model, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())  # its per-parameter dicts are the optimizer's own
    del sd["state"][0]["last_grad"]  # parameter 0 (a.weight, MARS-M branch) lost a key
    torch.save(sd, tmp_path / "damaged.pt")
    assert main(["convert", str(tmp_path / "damaged.pt"), str(tmp_path / "out"), "--to", "neutral"]) == 2
    assert "'state.a.weight.last_grad' is missing" in capsys.readouterr().err
    torch.save(opt.state_dict(), tmp_path / "good.pt")
    (tmp_path / "out").mkdir()
    assert main(["convert", str(tmp_path / "good.pt"), str(tmp_path / "out"), "--to", "neutral"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "good.pt"), str(tmp_path / "out"), "--to", "nope"]) == 2
    assert "unknown format 'nope'" in capsys.readouterr().err


def test_the_command_runs_as_a_module_and_prints_a_table(tmp_path):
    model, opt = _trained()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    command = [sys.executable, "-m", "marsm_dist.checkpoint", "inspect", str(tmp_path / "optimizer.pt")]
    run = subprocess.run(command,
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert "10 parameters (7 adamw, 3 marsm); step 3" in run.stdout
    assert "a.weight" in run.stdout and "exp_avg (float32), last_grad (float32)" in run.stdout
