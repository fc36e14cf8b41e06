"""launch/megatron.sh runs the real integrations/megatron/pretrain_gpt.py under torchrun: train and
save a dist-checkpoint with the distributed optimizer at TP=1/DP=2, then resume it at TP=2/DP=1.
megatron-core's GPT needs CUDA; tests/helpers/megatron_cpu_site puts the test-only CPU shim into the
ranks torchrun starts (the script and the launcher are unchanged)."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.launch_env import megatron_cpu_env

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
MODEL = ["--hidden-size", "32", "--num-layers", "1", "--seq-length", "32", "--global-batch-size", "4",
         "--lr-warmup-iters", "1", "--log-interval", "1", "--marsm-ns-dtype", "float32"]


def launch(*args: str) -> str:
    env = megatron_cpu_env(NUM_PROCS="2")
    out = subprocess.run(["bash", "launch/megatron.sh", *MODEL, *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def losses(log: str) -> dict[int, float]:
    return {int(i): float(v) for i, v in re.findall(r"iteration (\d+)/\d+ loss ([\d.]+)", log)}


def test_megatron_launcher_trains_saves_and_resumes_at_another_tp(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = launch("--use-distributed-optimizer", "--train-iters", "4", "--save", ckpt)
    assert "TP=1 DP=2 distributed_optimizer=True" in first and f"saved {ckpt} at iteration 4" in first
    resumed = launch("--tensor-model-parallel-size", "2", "--train-iters", "6", "--load", ckpt)
    assert "TP=2 DP=1" in resumed and "resumed from" in resumed
    a, b = losses(first), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [5, 6]
    assert all(math.isfinite(v) for v in [*a.values(), *b.values()])
    assert b[6] < a[1]  # the resumed run goes on from the trained weights and keeps learning


def test_megatron_launcher_on_a_cpu_stops_with_a_clear_message():
    """Without the test-only CUDA shim, megatron-core's GPT fails on a CPU machine; the launcher
    must say so (and what to run instead), not end in a raw assertion from inside torch."""
    from tests.helpers.launch_env import launcher_env

    env = launcher_env(NUM_PROCS="1", OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", "launch/megatron.sh", *MODEL, "--train-iters", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    # (torchrun itself still prints its ChildFailedError summary after the rank's message)
    assert "needs CUDA GPUs" in out.stderr and "launch/demo.sh" in out.stderr, out.stderr[-2000:]
