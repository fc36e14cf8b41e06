"""Launch scripts start real multi-process runs (slow-ish: a few seconds each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("config", ["zero1.json", "zero3.json"])
def test_deepspeed_launcher_trains_two_ranks(config):
    pytest.importorskip("deepspeed")
    env = dict(os.environ, MARSM_SKIP_SETUP="1", NUM_PROCS="2", MASTER_PORT=str(_free_port()),
               DS_CONFIG=f"integrations/deepspeed/{config}", DS_ACCELERATOR="cpu",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    args = ["--steps", "3", "--log-every", "1", "--d-model", "32", "--layers", "1"]
    out = subprocess.run(["bash", "launch/deepspeed.sh", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 3/3 loss" in out.stdout
