"""DeepSpeed universal checkpoints that carry MARS-M's state, written from a ZeRO checkpoint by
``python -m marsm_dist.checkpoint convert ... --to deepspeed-universal`` and loaded by DeepSpeed
itself (``"checkpoint": {"load_universal": true}``) at another data-parallel size and ZeRO stage.
DeepSpeed's own ``ds_to_universal`` stops on MARS-M's state (its issue #8608), and its ZeRO-3
loader reads only Adam's keys: the adapter installs one that reads every key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from tests.helpers import fsdp2_models as fm  # noqa: E402
from tests.helpers import moves  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]
STOP, MORE = 4, 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "marsm_dist.checkpoint", *args], capture_output=True,
                          text=True, timeout=180, env=env, cwd=ROOT)


def _largest(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """DeepSpeed's own checkpoint of a run stopped after 4 steps, per source kind (made once)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind) / "ckpt"
            run_distributed(moves.stop_deepspeed, 2, kind, str(made[kind]), STOP, timeout=240)
        return made[kind]
    return get


@pytest.fixture(scope="module")
def zero2_checkpoint(checkpoints) -> Path:
    return checkpoints("ds-z2")


def _universal(checkpoint: Path, out: Path) -> Path:
    run = _cli("convert", str(checkpoint), str(out), "--to", "deepspeed-universal")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def universal(zero2_checkpoint, tmp_path_factory) -> Path:
    return _universal(zero2_checkpoint, tmp_path_factory.mktemp("universal") / "ckpt")


def test_inspect_names_every_parameter_of_the_zero_checkpoint(zero2_checkpoint):
    run = _cli("inspect", str(zero2_checkpoint), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout)
    assert info["format"] == "deepspeed" and info["world_size"] == 2 and info["steps"] == [STOP]
    params = {p["name"]: p for p in info["params"]}
    assert params["a.weight"]["shape"] == [30, 16] and params["a.weight"]["branch"] == "marsm"
    assert sorted(params["a.weight"]["keys"]) == ["exp_avg", "last_grad"]
    assert sorted(params["norm.bias"]["keys"]) == ["exp_avg", "exp_avg_sq"]
    assert len(params) == 10


def test_the_universal_layout_holds_every_state_key(universal):
    tag = universal / (universal / "latest_universal").read_text()
    saved = torch.load(tag / "zero" / "a.weight" / "last_grad.pt", weights_only=False)
    assert saved["param"].shape == (30, 16) and saved["cat_dim"] == 0
    files = {f.name for f in (tag / "zero" / "emb.weight").iterdir()}
    assert files == {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt"}


MOVES = [("ds-z2", "ds-z3", 3), ("ds-z2", "ds-z1", 1), ("ds-z3", "ds-z2", 3)]


@pytest.mark.parametrize(("source", "kind", "world_size"), MOVES,
                         ids=[f"{a}w2-to-{b}w{c}" for a, b, c in MOVES])
def test_deepspeed_resumes_a_universal_checkpoint_at_another_size_and_stage(checkpoints, tmp_path, source,
                                                                             kind, world_size):
    universal = _universal(checkpoints(source), tmp_path / "universal")
    reference = fm.reference(moves.NAME, STOP + MORE, approx=True, ns_dtype=torch.float32)
    for result in run_distributed(moves.resume_universal, world_size, kind, str(universal), STOP, MORE,
                                  timeout=300):
        assert _largest(result["resumed"], result["straight"]) < 1e-5
        assert _largest(result["resumed"], reference) < 1e-5


def test_a_zero_checkpoint_converts_to_the_neutral_form_and_continues_under_fsdp2(zero2_checkpoint, tmp_path):
    out = tmp_path / "neutral"
    run = _cli("convert", str(zero2_checkpoint), str(out), "--to", "neutral")
    assert run.returncode == 0, run.stderr[-3000:]
    weights = tmp_path / "weights.pt"
    reference_at_stop = fm.reference(moves.NAME, STOP, approx=True, ns_dtype=torch.float32)
    torch.save(reference_at_stop, weights)  # the weights a model export would carry
    reference = fm.reference(moves.NAME, STOP + MORE, approx=True, ns_dtype=torch.float32)
    for result in run_distributed(moves.resume_neutral, 2, "fsdp2", str(weights), str(out), STOP, MORE):
        assert _largest(result["resumed"], reference) < 1e-5


def test_another_optimizers_deepspeed_checkpoint_is_refused_naming_its_keys(tmp_path):
    out = tmp_path / "adamw"
    run_distributed(moves.stop_deepspeed_adamw, 2, str(out), timeout=240)
    run = _cli("convert", str(out), str(tmp_path / "never"), "--to", "neutral")
    assert run.returncode == 2 and "another optimizer's state" in run.stderr and "'ns_steps'" in run.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()


def test_a_missing_rank_file_is_refused_before_anything_is_written(zero2_checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(zero2_checkpoint, damaged)
    next(damaged.glob("global_step*/zero_pp_rank_1_*optim_states.pt")).unlink()
    run = _cli("convert", str(damaged), str(tmp_path / "never"), "--to", "deepspeed-universal")
    assert run.returncode == 2 and "1 rank files" in run.stderr and "written by 2 ranks" in run.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.partial").exists()
