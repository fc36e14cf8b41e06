"""The demo trainer: 2 real FSDP2 ranks per run; every optimizer trains and the outputs are written."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from marsm_dist.demo.__main__ import main
from tests.helpers.demo_runs import TINY, check_summary
from tests.helpers.launch_env import launcher_env

ROOT = Path(__file__).resolve().parents[1]
@pytest.mark.distributed
@pytest.mark.slow
def test_demo_script_trains_every_optimizer(tmp_path):
    """README command 1 in its short form: table on stdout, PNG and JSON on disk."""
    pytest.importorskip("matplotlib")
    out = subprocess.run(
        ["bash", "launch/demo.sh", "--steps", "40", *TINY, "--json", str(tmp_path / "s.json"),
         "--png", str(tmp_path / "loss.png")],
        cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fsdp2 on 2 rank(s)" in out.stdout and "train loss" in out.stdout
    for name in ("marsm", "muon", "adamw"):
        assert any(line.startswith(name) for line in out.stdout.splitlines()), out.stdout
        assert f"{name} [" in out.stderr  # its progress bar
    check_summary(tmp_path / "s.json", ["marsm", "muon", "adamw"], 40)
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.distributed
@pytest.mark.slow
def test_demo_exact_mode_in_process(tmp_path):
    """``main`` forks the ranks itself (the path the demo takes without a launcher)."""
    code = main(["--optimizers", "marsm", "--mode", "exact", "--steps", "30", *TINY,
                 "--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "loss.png")])
    assert code == 0
    check_summary(tmp_path / "s.json", ["marsm"], 30)


@pytest.mark.distributed
@pytest.mark.slow
def test_demo_deepspeed_framework_uses_the_json_route(tmp_path):
    """--framework deepspeed: MARS-M from "type": "MARSM" in the engine's config, under ZeRO-2."""
    pytest.importorskip("deepspeed")
    code = main(["--framework", "deepspeed", "--zero-stage", "2", "--optimizers", "marsm,adamw",
                 "--steps", "30", *TINY, "--json", str(tmp_path / "s.json"),
                 "--png", str(tmp_path / "l.png")])
    assert code == 0
    check_summary(tmp_path / "s.json", ["marsm", "adamw"], 30)
    assert json.loads((tmp_path / "s.json").read_text())["config"]["framework"] == "deepspeed"


@pytest.mark.parametrize("argv, flag", [
    (["--optimizers", "marsm,sgd"], "--optimizers"),
    (["--batch-size", "5"], "--batch-size"),
    (["--framework", "deepspeed", "--mode", "exact"], "--mode exact"),
    (["--framework", "megatron", "--mode", "exact"], "--mode exact"),
    (["--framework", "megatron", "--tensor-parallel", "2"], "muon with --tensor-parallel > 1"),
    (["--framework", "megatron", "--tensor-parallel", "3", "--optimizers", "marsm"], "--tensor-parallel 3"),
    (["--framework", "megatron", "--tensor-parallel", "2", "--heads", "3", "--d-model", "48",
      "--optimizers", "marsm"], "--heads 3"),
    (["--tensor-parallel", "2"], "--tensor-parallel is for --framework megatron"),
    (["--distributed-optimizer"], "--distributed-optimizer is for --framework megatron"),
    (["--gamma", "-1"], "--gamma"),
    (["--framework", "megatron", "--distributed-optimizer"], "muon with --distributed-optimizer"),
])
def test_bad_flags_are_refused_before_any_process_starts(capsys, argv, flag):
    assert main(argv) == 2
    assert flag in capsys.readouterr().err


def test_gamma_flag_reaches_marsm_and_defaults_to_marsms_own():
    """--gamma is MARSM's variance-reduction strength (benchmarks/quality.py sweeps gamma=0)."""
    import inspect
    from dataclasses import replace

    from marsm_dist import MARSM
    from marsm_dist.demo.cli import base_config, parse_args
    from marsm_dist.demo.model import TinyGPT
    from marsm_dist.demo.optimizers import build_optimizer

    default = inspect.signature(MARSM).parameters["gamma"].default
    for argv, gamma in [(["--gamma", "0"], 0.0), ([], default)]:
        cfg = replace(base_config(parse_args(argv)), optimizer="marsm", ns_dtype="float32")
        opt = build_optimizer(cfg, TinyGPT(16, 1, 2, 8))
        assert {g["gamma"] for g in opt.param_groups if "gamma" in g} == {gamma}, argv
