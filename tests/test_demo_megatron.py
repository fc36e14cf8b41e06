"""The demo's --framework megatron: real megatron-core (GPTModel, DDP, its optimizer wrappers) under
torchrun. megatron-core's GPT needs CUDA; tests/helpers/megatron_cpu_site puts the test-only CPU shim into
the ranks torchrun starts, so the demo itself runs unchanged. The independent check: Megatron's CPU
initialization and MARS-M's gathered Newton-Schulz make the loss curves at tensor-parallel size 2,
and with the optimizer state sharded over data-parallel ranks, the same as at size 1 unsharded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.demo_runs import TINY, check_summary
from tests.helpers.launch_env import launcher_env, megatron_cpu_env

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STEPS = 30


def _torchrun_demo(tmp_path: Path, name: str, *args: str) -> tuple[str, dict]:
    env = megatron_cpu_env(NUM_PROCS="2")
    summary = tmp_path / f"{name}.json"
    out = subprocess.run(["bash", "launch/torchrun.sh", "--framework", "megatron", "--steps", str(STEPS),
                          *TINY, *args, "--json", str(summary), "--png", str(tmp_path / f"{name}.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, json.loads(summary.read_text())


def test_megatron_demo_compares_optimizers_and_parallelism_changes_nothing(tmp_path):
    """TP=1 with all three optimizers; TP=2 and the distributed optimizer must give the same curves."""
    log1, tp1 = _torchrun_demo(tmp_path, "tp1")
    assert "megatron-core GPTModel" in log1 and "tensor-parallel size 1" in log1
    check_summary(tmp_path / "tp1.json", ["marsm", "muon", "adamw"], STEPS)
    log2, tp2 = _torchrun_demo(tmp_path, "tp2", "--tensor-parallel", "2", "--optimizers", "marsm,adamw")
    assert "tensor-parallel size 2" in log2
    assert tp2["config"]["tensor_parallel"] == 2
    _, sharded = _torchrun_demo(tmp_path, "distopt", "--distributed-optimizer", "--optimizers", "marsm,adamw")
    curves1 = {r["optimizer"]: r["losses"] for r in tp1["results"]}
    for r in [*tp2["results"], *sharded["results"]]:
        assert r["losses"] == pytest.approx(curves1[r["optimizer"]], rel=2e-3, abs=2e-3), r["optimizer"]
    # The three runs differ: each optimizer really stepped its own way.
    finals = sorted(r["final_train_loss"] for r in tp1["results"])
    assert finals[1] - finals[0] > 1e-3 and finals[2] - finals[1] > 1e-3


def test_megatron_demo_on_a_cpu_says_it_needs_gpus():
    out = subprocess.run([sys.executable, "-m", "marsm_dist.demo", "--framework", "megatron", "--world-size",
                          "1", "--steps", "1", *TINY], cwd=ROOT, env=launcher_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "--framework megatron needs CUDA GPUs" in out.stderr and "--framework fsdp2" in out.stderr
