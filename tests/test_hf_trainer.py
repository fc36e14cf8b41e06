"""The Hugging Face Trainer recipes (``integrations/hf``): the factory's routing, the refusal of
the Trainer's own groups, and each route (DDP, FSDP2 through Accelerate, DeepSpeed ZeRO from the
JSON) run at 2 ranks through torchrun: checkpoint, resume, the same trajectory, the sharding
engaged, and the losses of a single-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the [clients] extra; launch/setup.sh installs it

from transformers import Trainer, TrainingArguments  # noqa: E402

from marsm_dist import MARSM, param_groups  # noqa: E402
from marsm_dist.adapters.hf import MARSMForTrainer  # noqa: E402
from tests.helpers.launch_env import launcher_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "integrations" / "hf"
sys.path.insert(0, str(RECIPES))
from common import CountingSequences, tiny_gpt2  # noqa: E402

STEPS, SAVE_AT = 6, 3
MATRICES = 8  # 2 GPT-2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj)


def _trainer(tmp_path: Path, optimizer_cls_and_kwargs) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    return Trainer(model=tiny_gpt2(0), args=args, train_dataset=CountingSequences(64),
                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)


def test_the_trainer_building_marsm_from_its_own_groups_is_refused_with_the_working_line(tmp_path):
    """The Trainer's groups are bare tensors: MARSM would give the 2-D token and position
    embeddings (and the tied head) the MARS-M update. It must say so and show the factory."""
    trainer = _trainer(tmp_path, (MARSM, {"lr": 2e-2}))
    with pytest.raises(TypeError, match=r"optimizer_cls_and_kwargs=\(MARSMForTrainer"):
        trainer.create_optimizer()
    # The same groups built by the user (not the Trainer) keep MARSM's documented shape routing.
    MARSM([{"params": [p for p in tiny_gpt2(0).parameters()]}])


def test_the_factory_routes_embeddings_and_head_to_adamw_as_param_groups_does(tmp_path):
    trainer = _trainer(tmp_path, (MARSMForTrainer, {"lr": 2e-2, "weight_decay": 0.05}))
    opt = trainer.create_optimizer()
    assert isinstance(opt, MARSM) and opt.process_group is None  # one process: nothing to share
    routed = {p: g["use_marsm"] for g in opt.param_groups for p in g["params"]}
    model = trainer.model
    expected = {p: g["use_marsm"] for g in param_groups(model) for _, p in g["params"]}
    assert routed == expected
    assert routed[model.transformer.wte.weight] is False and routed[model.transformer.wpe.weight] is False
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one tensor, on AdamW
    assert sum(routed.values()) == MATRICES
    assert all(g["lr"] == 2e-2 and g["weight_decay"] == 0.05 for g in opt.param_groups)
    with pytest.raises(ValueError, match="process_group"):
        MARSMForTrainer()(model, process_group="world")


def _process_groups_the_factory_picks(rank: int, world_size: int) -> dict:
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import fully_shard

    picked = {"ddp": MARSMForTrainer()(tiny_gpt2(0)).process_group is dist.group.WORLD,
              "opted_out": MARSMForTrainer()(tiny_gpt2(0), process_group=None).process_group is None}
    sharded = tiny_gpt2(0)
    fully_shard(sharded)
    picked["fsdp2"] = MARSMForTrainer()(sharded).process_group is None
    state = PartialState(cpu=True)  # what the Trainer's DeepSpeed route leaves behind
    state.distributed_type = DistributedType.DEEPSPEED
    picked["deepspeed"] = MARSMForTrainer()(tiny_gpt2(0)).process_group is None
    return picked


@pytest.mark.distributed
def test_the_factory_shares_newton_schulz_over_ddp_replicas_only(run_ranks):
    """Plain replicated parameters (the Trainer's DDP) get the world group; FSDP2's DTensors and
    DeepSpeed's partitions bring their own, so the factory leaves it unset there."""
    for picked in run_ranks(_process_groups_the_factory_picks, 2, timeout=120):
        assert picked == {"ddp": True, "opted_out": True, "fsdp2": True, "deepspeed": True}


# ------------------------------------------------------------------- the recipes, at 2 ranks
def _launch(script: str, out: Path, *extra: str, procs: int = 2, shim: str | None = None,
            batch: int = 8) -> dict:
    """torchrun the recipe; return rank 0's JSON with the other ranks' MARS-M figures added."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd += [str(ROOT / "tests" / "helpers" / "hf_cpu_run.py")] if shim else []
    log = out.parent / f"{out.name}.json"
    cmd += [str(RECIPES / script), "--output-dir", str(out), "--steps", str(STEPS), "--save-steps",
            str(SAVE_AT), "--ns-dtype", "float32", "--batch-size", str(batch), "--log-json", str(log), *extra]
    env = launcher_env(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    if shim:
        env["HF_CPU_DISTRIBUTED_TYPE"] = shim
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(log.read_text())
    result["ranks"] = [result["marsm"]] + [json.loads(Path(f"{log}.rank{r}").read_text())["marsm"]
                                           for r in range(1, procs)]
    result["stdout"] = run.stdout
    return result


def _losses(result: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in result["losses"]}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict[int, float]:
    """The reference: one process, the whole global batch (16), the same MARSM."""
    out = tmp_path_factory.mktemp("hf_w1") / "run"
    return _losses(_launch("train_ddp.py", out, procs=1, batch=16))


ROUTES = {
    "ddp": ("train_ddp.py", None, ()),
    "fsdp2": ("train_fsdp2.py", "MULTI_GPU", ()),
    "deepspeed_zero2": ("train_deepspeed.py", "DEEPSPEED", ("--deepspeed", str(RECIPES / "ds_zero2.json"))),
    "deepspeed_zero3": ("train_deepspeed.py", "DEEPSPEED", ("--deepspeed", str(RECIPES / "ds_zero3.json"))),
}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("route", list(ROUTES))
def test_recipe_trains_sharded_and_resumes_on_the_same_trajectory(route, tmp_path, single_process):
    script, shim, extra = ROUTES[route]
    full = _launch(script, tmp_path / "run", *extra, shim=shim)
    # Sharded: every matrix has exactly one owner in the job, and the ranks exchanged bytes (except
    # under ZeRO-2, where each tiny matrix lies whole in one rank's flat partition and that rank owns
    # it: the locality rule moves nothing).
    for stats in full["ranks"]:
        assert stats["sharded_matrices"] == MATRICES
        assert stats["bytes_sent"] > 0 or route == "deepspeed_zero2"
    assert sum(s["owned_matrices"] for s in full["ranks"]) == MATRICES
    assert "orthogonalized" in full["stdout"] and "of 8 sharded matrices" in full["stdout"]  # the callback
    # The same losses as one process with the whole batch (float32 Newton-Schulz; the reductions
    # are summed in another order).
    losses = _losses(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(single_process[step], rel=1e-5, abs=1e-5), step
    # Resume from the Trainer's checkpoint at step 3: steps 4-6 are bitwise the uninterrupted ones.
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    resumed = _launch(script, tmp_path / "run", *extra, "--resume", str(checkpoint), shim=shim)
    assert _losses(resumed) == {s: losses[s] for s in range(SAVE_AT + 1, STEPS + 1)}
    assert torch.tensor(losses[STEPS]).isfinite()
