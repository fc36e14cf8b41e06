"""The Lightning recipe (integrations/lightning/train.py) at 2 CPU ranks, FSDP2 and DDP.

Each strategy trains N steps once, started as a user would (Lightning's own launcher starts the
second rank), saving a checkpoint every K steps. Then:

- a fresh run resumes from the step-K checkpoint through ``Trainer.fit(ckpt_path=...)``: steps
  K+1..N must repeat the uninterrupted run bitwise (losses, parameters and optimizer state):
  same ranks, same thread count, deterministic gloo collectives, and a restore that copies every
  fp32 value back, so nothing may differ at all;
- a plain single-process PyTorch loop (no Lightning, unsharded MARSM, the whole global batch)
  must give the same losses and parameters within float32 rounding: the distributed run sums the
  gradient and the norms in another order, and Newton-Schulz (float32 here) carries those ~1e-7
  relative differences on;
- the JSON shows the sharding engaged: every MARS-M matrix has exactly one owner rank each step,
  every rank owns some and moves bytes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from marsm_dist import MARSM, param_groups
from tests.helpers.launch_env import launcher_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "integrations" / "lightning"
N, K, BATCH, LR, SEED = 6, 3, 8, 2e-2, 0
FLAGS = ["--devices", "2", "--accelerator", "cpu", "--max-steps", str(N), "--ckpt-every", str(K),
         "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED), "--ns-dtype", "float32"]
LOSS_RTOL = 1e-5  # reference vs distributed losses (float32 NS); measured 5.5e-8 relative
PARAM_ATOL = 1e-5  # reference vs distributed parameters after N steps; measured 1.2e-7


def _recipe_model():
    """integrations/lightning/model.py (plain torch): the recipe's model and batches."""
    spec = importlib.util.spec_from_file_location("lightning_recipe_model", RECIPE / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(tmp: Path, name: str, strategy: str, *extra: str) -> tuple[dict, str]:
    """Run the recipe at 2 ranks; returns rank 0's JSON log and the combined output."""
    # One thread per rank (2 cores); MASTER_PORT: Lightning's launcher takes it from the environment.
    env = launcher_env(OMP_NUM_THREADS="1")
    log = tmp / f"{name}.json"
    out = subprocess.run([sys.executable, str(RECIPE / "train.py"), "--strategy", strategy, *FLAGS,
                          "--ckpt-dir", str(tmp / name), "--log-json", str(log), *extra],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return json.loads(log.read_text()), out.stdout + out.stderr


def _weights_and_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Model parameters and optimizer state of a Lightning checkpoint, flattened to name -> tensor.
    FSDP2 writes a DCP directory (converted here in one process), DDP one torch.save file."""
    if ckpt.is_dir():
        whole = ckpt.parent / f"{ckpt.name}.pt"
        dcp_to_torch_save(ckpt, whole)
        sd = torch.load(whole, weights_only=False)
        params, optim = sd["state_dict"], sd["optimizer_0"]
        names = {n: n for n in optim["state"]}  # DCP keys the optimizer state by parameter name
    else:
        sd = torch.load(ckpt, weights_only=False)
        params, optim = sd["state_dict"], sd["optimizer_states"][0]
        groups = optim["param_groups"]  # a plain state dict keys the state by index
        names = {i: n for g in groups for i, n in zip(g["params"], g["param_names"], strict=True)}
    flat = {f"param/{n}": t for n, t in params.items()}
    for key, state in optim["state"].items():
        flat.update({f"state/{names[key]}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return flat


@pytest.fixture(scope="module", params=["fsdp2", "ddp"])
def run(request, tmp_path_factory) -> dict:
    """The uninterrupted N-step run of one strategy, shared by the tests below."""
    tmp = tmp_path_factory.mktemp(request.param)
    log, _ = _train(tmp, "full", request.param)
    return {"strategy": request.param, "tmp": tmp, "log": log}


def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training in one process without Lightning: the whole global batch, unsharded MARSM,
    the recipe's clipping and schedule. Returns the losses and the final parameters."""
    m = _recipe_model()
    torch.manual_seed(SEED)  # what seed_everything(SEED) does to torch before the recipe builds it
    model = m.TinyGPT(64, 32, 2, 2, 16)
    opt = MARSM(param_groups(model), lr=LR, weight_decay=0.1, ns_dtype="float32")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=N, cycle_momentum=False)
    losses = []
    for step in range(N):
        loss = model(*m.token_batch(SEED, step, BATCH, 16, 64))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {f"param/model.{n}": p.detach() for n, p in model.named_parameters()}


def test_resume_from_lightning_checkpoint_repeats_the_run_bitwise(run):
    tmp, full = run["tmp"], run["log"]
    ckpt = tmp / "full" / f"step={K}.ckpt"  # saved by Lightning's ModelCheckpoint during the full run
    resumed, output = _train(tmp, "resumed", run["strategy"], "--resume", str(ckpt))
    assert "Restored all states from the checkpoint" in output
    assert "not resumable" not in output  # the loader's position was saved: no restarted epoch
    assert [s["step"] for s in resumed["steps"]] == list(range(K + 1, N + 1))
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"][K:]]
    a = _weights_and_state(tmp / "full" / f"step={N}.ckpt")
    b = _weights_and_state(tmp / "resumed" / f"step={N}.ckpt")
    assert a.keys() == b.keys() and any(k.endswith("/exp_avg") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def test_losses_and_weights_match_a_single_process_run(run):
    losses, params = _reference()
    got = [s["loss"] for s in run["log"]["steps"]]
    assert [s["step"] for s in run["log"]["steps"]] == list(range(1, N + 1))
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, losses, strict=True))
    assert rel < LOSS_RTOL, (rel, got, losses)
    final = _weights_and_state(run["tmp"] / "full" / f"step={N}.ckpt")
    diff = max((final[k] - p).abs().max().item() for k, p in params.items())
    assert diff < PARAM_ATOL, diff
    assert losses[-1] < losses[0]  # it learns


def test_json_shows_the_newton_schulz_work_sharded(run):
    log = run["log"]
    matrices = sum(len(g["params"]) for g in param_groups(_recipe_model().TinyGPT()) if g["use_marsm"])
    assert log["world_size"] == 2 and log["marsm_matrices"] == matrices == 8  # 4 Linear x 2 blocks
    for step in log["steps"]:
        ranks = step["ranks"]
        assert sum(r["owned_matrices"] for r in ranks) == matrices  # one owner per matrix, in all
        assert all(r["owned_matrices"] > 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0
                   for r in ranks)
        assert sum(r["bytes_sent"] for r in ranks) == sum(r["bytes_received"] for r in ranks)
