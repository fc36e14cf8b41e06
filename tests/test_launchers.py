"""Launch scripts start real multi-process runs of the demo trainer (a few seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.launch_env import launcher_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TINY = ["--steps", "4", "--d-model", "32", "--heads", "2", "--layers", "1", "--batch-size", "4",
        "--seq-len", "16", "--log-every", "2", "--optimizers", "marsm,adamw"]


def _env(**extra: str) -> dict:
    return launcher_env(NUM_PROCS="2", **extra)


def _run_demo_launcher(cmd: list[str], tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a launcher with the tiny demo flags; both ranks train and rank 0 writes the summary."""
    summary = tmp_path / "summary.json"
    out = subprocess.run([*cmd, *TINY, "--json", str(summary), "--png", str(tmp_path / "loss.png")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "on 2 rank(s)" in out.stdout and "train loss" in out.stdout  # rank 0's header and table
    result = json.loads(summary.read_text())
    assert result["world_size"] == 2
    assert [len(r["losses"]) for r in result["results"]] == [4, 4]
    return out


def test_torchrun_launcher_runs_the_demo(tmp_path):
    _run_demo_launcher(["bash", "launch/torchrun.sh"], tmp_path, _env())


def test_mpirun_launcher_takes_ranks_from_mpi(tmp_path):
    # The script installs the [mpi] extra (mpi4py + the mpich wheel) on first use.
    _run_demo_launcher(["bash", "launch/mpirun.sh"], tmp_path, _env())


def test_slurm_template_starts_torchrun_with_its_arguments(tmp_path):
    """Slurm is not here: stand-ins for `scontrol` (one node: localhost) and `srun` (run the
    command on this machine) let the template's real torchrun command line start 2 ranks."""
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], cwd=ROOT).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n'
                                      '[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    # srun: drop its own options, run the command once (one task on the one node).
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = _env(SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242",
               SLURM_SUBMIT_DIR=str(ROOT))
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    out = _run_demo_launcher(["bash", "launch/slurm.sbatch"], tmp_path, env)
    assert "1 node(s) x 2 rank(s), rendezvous at localhost:" in out.stdout


@pytest.mark.parametrize("config", ["zero1.json", "zero3.json"])
def test_deepspeed_launcher_trains_two_ranks(config):
    pytest.importorskip("deepspeed")
    env = _env(DS_CONFIG=f"integrations/deepspeed/{config}", DS_ACCELERATOR="cpu")
    args = ["--steps", "3", "--log-every", "1", "--d-model", "32", "--layers", "1"]
    out = subprocess.run(["bash", "launch/deepspeed.sh", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 3/3 loss" in out.stdout
