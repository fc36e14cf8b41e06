"""The GPU check (launch/gpu_check.sh): its dry mode runs end to end on the CPU and writes a JSON
in which every section is present and either ran ("ok") or says why not ("skipped"); nothing may
fail or pass silently. The section runner's rules are tested directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import __main__ as gpu_check
from benchmarks.gpu_check.core import Skip, record

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["env", "matmul", "newton_schulz", "correctness", "host_syncs", "step_time", "memory",
            "distributed", "shared_gpu"]


def _check_record(name: str, rec: dict, section: bool = True) -> None:
    assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec.get("traceback"))
    if rec["status"] == "skipped":
        assert rec["reason"].strip(), name
    elif section:  # a section's one-line result for the table (its checks need none)
        assert rec["summary"].strip(), name
    for sub, check in rec.get("checks", {}).items():
        _check_record(f"{name}.{sub}", check, section=False)


@pytest.mark.slow
@pytest.mark.distributed
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--dry", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "dry" and doc["ok"] and doc["failed"] == []
    assert list(doc["sections"]) == SECTIONS
    for name, rec in doc["sections"].items():
        _check_record(name, rec)
        assert f"\n{name} " in proc.stdout  # its row in the closing table
    s = doc["sections"]
    # What must really run on the CPU (a skip here would hide a broken driver):
    for name in ("env", "matmul", "newton_schulz", "correctness", "host_syncs", "step_time", "distributed",
                 "shared_gpu"):
        assert s[name]["status"] == "ok", (name, s[name])
    assert s["matmul"]["tflops"] > 0
    assert s["newton_schulz"]["models"]["llama3-8b"]["marsm"]["tflops"] > 0
    assert s["correctness"]["checks"]["trajectory_approx"]["max_rel_diff"] < 1e-4
    assert s["correctness"]["checks"]["matrices_only"]["status"] == "ok"
    assert s["host_syncs"]["device"] == "meta" and s["host_syncs"]["host_reads"] >= 1
    assert set(s["step_time"]["step_ms"]) >= {"marsm", "muon+adamw", "adamw"}
    assert s["step_time"]["floor_multiple"]["marsm"] > 0 and s["step_time"]["floor_ms"]["bfloat16"] > 0
    fsdp2 = s["distributed"]["checks"]["fsdp2"]
    assert fsdp2["status"] == "ok" and fsdp2["float32"]["shadow_max_abs_diff"] < 1e-5
    assert fsdp2["devices"] == ["cpu", "cpu"]
    # W > 1 ranks on one device over gloo: every configuration ran, matched one process and issued
    # its collectives in one order; the teams configuration really had a team.
    shared = s["shared_gpu"]["checks"]
    assert set(shared) == {"fsdp2_w2", "fsdp2_w4", "hsdp_w4", "ddp_w2", "ddp_w4", "teams_w4"}
    assert all(c["status"] == "ok" and c["max_abs_diff_vs_single_process"] < 1e-5 for c in shared.values())
    assert shared["teams_w4"]["teams"] and doc["commit"] and doc["started"]


def test_section_outcomes_are_recorded_never_hidden():
    assert record(lambda: {"summary": "x"})["status"] == "ok"
    skipped = record(lambda: (_ for _ in ()).throw(Skip("no GPU", error="boom")))
    assert skipped["status"] == "skipped" and skipped["reason"] == "no GPU" and skipped["error"] == "boom"
    failed = record(lambda: 1 / 0)
    assert failed["status"] == "failed" and "ZeroDivisionError" in failed["error"] and failed["traceback"]
    missed = record(lambda: {"problems": ["diff 1e-2 > 1e-4"]})
    assert missed["status"] == "failed" and "1e-2" in missed["error"]
    nested = {"a": {"status": "ok"}, "b": {"status": "failed", "error": "rank 1 hung"}}
    assert record(lambda: {"checks": nested})["status"] == "failed"
    all_skipped = {"a": {"status": "skipped", "reason": "r1"}, "b": {"status": "skipped", "reason": "r2"}}
    rec = record(lambda: {"checks": all_skipped})
    assert rec["status"] == "skipped" and "r1" in rec["reason"] and "r2" in rec["reason"]


def test_a_failed_section_fails_the_run(tmp_path, monkeypatch, capsys):
    def broken(ctx):
        raise RuntimeError("planted")

    monkeypatch.setitem(gpu_check.SECTIONS, "env", broken)
    out = tmp_path / "g.json"
    assert gpu_check.main(["--dry", "--only", "env,matmul", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["failed"] == ["env"] and doc["sections"]["matmul"]["status"] == "ok"
    assert "FAILED: env" in capsys.readouterr().out


def test_gpu_mode_without_cuda_refuses(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--dry" in capsys.readouterr().err


def test_sync_warnings_are_split_into_inside_and_outside_the_step(monkeypatch):
    """The CUDA sync counter (GPU only) classifies each warning by its Python stack: a sync in
    opt.step() counts, one raised by switching the debug mode does not."""
    import warnings

    from benchmarks.gpu_check import optim

    def set_mode(mode):
        if mode == 0:
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    class Opt:
        def step(self):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
            warnings.warn("something else entirely", stacklevel=1)

    monkeypatch.setattr(optim.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(optim.torch.cuda, "set_sync_debug_mode", set_mode)
    inside, outside = optim._sync_warnings(Opt())
    assert len(inside) == 1 and "step" in inside[0]
    assert len(outside) == 1 and "set_mode" in outside[0]
