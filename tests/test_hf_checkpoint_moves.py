"""A Hugging Face Trainer run moves between frameworks and world sizes with its MARS-M state
(``MARSMCheckpointCallback``, the recipes' ``--neutral``): DeepSpeed ZeRO-3 at 2 ranks stops at
step 3 of 6 and FSDP2 at 3 ranks continues, and back, and FSDP2 into one plain process; the
resumed steps have the losses of the uninterrupted run. Without MARS-M's state they do not.

Every run takes the same global batch (12 sequences: 6, 4 or 12 per rank), float32
Newton-Schulz and a constant learning rate, so the frameworks' runs agree to 1e-5. Step 4's loss
shows the moved weights; steps 5-6 the moved optimizer state. Also: a bf16 ZeRO-3 run resumes
from its fp32 masters, and a warmup schedule with its position and lr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")  # the [clients] extra; launch/setup.sh installs it
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from marsm_dist.adapters.hf import MARSMCheckpointCallback  # noqa: E402
from marsm_dist.adapters.hf.neutral_checkpoint import (  # noqa: E402
    WEIGHTS,
    _write_weights,
    full_weights,
    load_full_weights,
    neutral_resume_path,
)
from tests.helpers.launch_env import launcher_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "integrations" / "hf"
sys.path.insert(0, str(RECIPES))
from common import tiny_gpt2  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH = 6, 3, 12
ROUTES = {  # recipe, the distributed type hf_cpu_run gives Accelerate, extra flags
    "deepspeed": ("train_deepspeed.py", "DEEPSPEED", ("--deepspeed", str(RECIPES / "ds_zero3.json"))),
    "fsdp2": ("train_fsdp2.py", "MULTI_GPU", ()),
    "ddp": ("train_ddp.py", None, ()),
    "deepspeed-bf16": (__file__, "DEEPSPEED", ()),  # this file's __main__: see _bf16_deepspeed_recipe
}


def _launch(route: str, out: Path, *extra: str, procs: int, check: bool = True):
    """torchrun the route's recipe at ``procs`` ranks; return (step -> loss, the finished run)."""
    script, shim, flags = ROUTES[route]
    log = out.parent / f"{out.name}-{route}-{procs}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd += [str(ROOT / "tests" / "helpers" / "hf_cpu_run.py")] if shim else []
    cmd += [str(RECIPES / script), "--output-dir", str(out), "--steps", str(STEPS),
            "--save-steps", str(SAVE_AT), "--ns-dtype", "float32", "--batch-size", str(GLOBAL_BATCH // procs),
            "--log-json", str(log), *flags, *extra]
    env = launcher_env(DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if shim:
        env["HF_CPU_DISTRIBUTED_TYPE"] = shim
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if not check:
        return None, run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return {row["step"]: row["loss"] for row in json.loads(log.read_text())["losses"]}, run


def _assert_continues(resumed: dict[int, float], straight: dict[int, float], start: int = SAVE_AT) -> None:
    assert sorted(resumed) == list(range(start + 1, STEPS + 1)), sorted(resumed)
    for step, loss in resumed.items():
        assert loss == pytest.approx(straight[step], rel=1e-5, abs=1e-5), (step, loss, straight[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted runs, with ``--neutral`` checkpoints at step 3: DeepSpeed ZeRO-3 at 2
    ranks and FSDP2 at 3 ranks."""
    base = tmp_path_factory.mktemp("hf_moves")
    out = {}
    for route, procs in (("deepspeed", 2), ("fsdp2", 3)):
        losses, _ = _launch(route, base / route, "--neutral", procs=procs)
        out[route] = (losses, base / route / f"checkpoint-{SAVE_AT}")
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_the_uninterrupted_runs_agree_and_their_checkpoints_carry_the_neutral_state(runs):
    ds, ds_ckpt = runs["deepspeed"]
    fsdp2, fsdp2_ckpt = runs["fsdp2"]
    assert sorted(ds) == list(range(1, STEPS + 1))
    _assert_continues(fsdp2, ds, start=0)  # one trajectory whatever the framework: the reference
    for ckpt in (ds_ckpt, fsdp2_ckpt):
        assert (ckpt / "marsm_state" / "marsm_state.json").is_file()
        assert (ckpt / WEIGHTS).is_file() and (ckpt / "scheduler.pt").is_file()
    assert list(ds_ckpt.glob("global_step*")) and (fsdp2_ckpt / "optimizer_0").is_dir()  # the natives


MOVES = [("deepspeed", "fsdp2", 3), ("fsdp2", "deepspeed", 2),
         ("fsdp2", "ddp", 1)]  # the plain route loads weights before the hook, and refuses FSDP's there


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize(("source", "route", "procs"), MOVES, ids=[f"{a}-to-{b}{n}" for a, b, n in MOVES])
def test_a_trainer_run_continues_under_another_framework_and_world_size(runs, tmp_path, source, route, procs):
    """ZeRO-3 at 2 ranks -> FSDP2 at 3, FSDP2 at 3 -> ZeRO-3 at 2, FSDP2 at 3 -> one plain process."""
    uninterrupted, ckpt = runs[source]
    resumed, _ = _launch(route, tmp_path / "run", "--neutral", "--resume", str(ckpt), procs=procs)
    _assert_continues(resumed, uninterrupted)


@pytest.mark.distributed
@pytest.mark.slow
def test_negative_control_without_marsm_state_the_losses_differ(runs, tmp_path):
    """The comparison above can fail: the same FSDP2 run resumed by the Trainer alone from a copy
    of its checkpoint without the optimizer files (the Trainer then silently starts MARS-M from
    zero, and keeps the weights) leaves the uninterrupted trajectory."""
    fsdp2, fsdp2_ckpt = runs["fsdp2"]
    ckpt = tmp_path / "no-optimizer"
    shutil.copytree(fsdp2_ckpt, ckpt, ignore=shutil.ignore_patterns("optimizer_0", "marsm_state"))
    resumed, _ = _launch("fsdp2", tmp_path / "run", "--resume", str(ckpt), procs=3)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    assert max(abs(resumed[s] - fsdp2[s]) for s in resumed) > 1e-3, (resumed, fsdp2)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_foreign_checkpoint_without_marsm_state_is_refused(runs, tmp_path):
    """With the callback, that silent restart is an error instead."""
    _, ds_ckpt = runs["deepspeed"]
    ckpt = tmp_path / "no-neutral"
    shutil.copytree(ds_ckpt, ckpt, ignore=shutil.ignore_patterns("marsm_state"))
    _, run = _launch("ddp", tmp_path / "run", "--neutral", "--resume", str(ckpt), procs=1, check=False)
    assert run.returncode != 0
    assert "holds neither this framework's optimizer state nor a complete marsm_state/" in run.stderr


def _schedule_probe(base: str) -> None:
    """Run in a fresh interpreter (the Trainer sets process-wide state): a plain one-process run
    under a warmup-then-decay schedule, stopped at step 2, resumed from a copy of its checkpoint
    without optimizer.pt, so from the neutral form; prints both runs' losses."""
    from common import CountingSequences, LossLog
    from transformers import Trainer, TrainingArguments

    from marsm_dist.adapters.hf import MARSMForTrainer

    def run(out: str, resume: str | None = None) -> dict[int, float]:
        args = TrainingArguments(output_dir=out, max_steps=5, save_steps=2, per_device_train_batch_size=8,
                                 logging_steps=1, seed=0, lr_scheduler_type="linear", warmup_steps=2,
                                 report_to="none", use_cpu=True)
        log = LossLog()
        Trainer(model=tiny_gpt2(0), args=args, train_dataset=CountingSequences(256),
                optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": 2e-2, "ns_dtype": "float32"}),
                callbacks=[log, MARSMCheckpointCallback()]).train(resume_from_checkpoint=resume)
        return {row["step"]: row["loss"] for row in log.rows}

    full = run(f"{base}/full")
    shutil.copytree(f"{base}/full/checkpoint-2", f"{base}/ckpt",
                    ignore=shutil.ignore_patterns("optimizer.pt"))  # the Trainer would restart MARS-M
    print("PROBE" + json.dumps({"full": full, "resumed": run(f"{base}/resumed", f"{base}/ckpt")}))


@pytest.mark.slow
def test_the_learning_rate_schedule_moves_with_the_state(tmp_path):
    """The schedule's position and the lr it set in the param groups come back (without the
    lr, step 3 would take the warmup's first lr, 0): the resumed steps are bitwise the same."""
    code = f"from tests.test_hf_checkpoint_moves import _schedule_probe; _schedule_probe({str(tmp_path)!r})"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env=launcher_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-5000:]
    out = json.loads(run.stdout.split("PROBE", 1)[1])
    assert sorted(out["resumed"]) == ["3", "4", "5"]
    assert out["resumed"] == {s: out["full"][s] for s in out["resumed"]}


def test_the_callback_checks_its_mode_and_installs_its_hook_once():
    from transformers import Trainer

    with pytest.raises(ValueError, match="resume must be one of"):
        MARSMCheckpointCallback(resume="always")
    MARSMCheckpointCallback()
    hook = Trainer._prepare_for_training
    MARSMCheckpointCallback(resume="neutral")
    assert Trainer._prepare_for_training is hook and hook._marsm_neutral


def _trainer(framework: str, world_size: int, *callbacks) -> SimpleNamespace:
    return SimpleNamespace(callback_handler=SimpleNamespace(callbacks=list(callbacks)),
                           args=SimpleNamespace(world_size=world_size),
                           is_deepspeed_enabled=framework == "deepspeed", is_fsdp_enabled=framework == "fsdp")


def test_a_checkpoint_resumes_from_the_neutral_form_when_its_own_files_cannot_serve(tmp_path):
    ckpt = tmp_path / "checkpoint-3"  # an FSDP checkpoint written at 2 ranks
    for folder in ("marsm_state", "pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / folder).mkdir(parents=True)
    (ckpt / "marsm_state" / "marsm_state.json").write_text(json.dumps(
        {"format": "marsm-neutral", "version": 1, "world_size": 2}))
    auto, neutral = MARSMCheckpointCallback(), str(ckpt / "marsm_state")
    always, never = MARSMCheckpointCallback(resume="neutral"), MARSMCheckpointCallback(resume="native")
    assert neutral_resume_path(_trainer("fsdp", 4), str(ckpt)) is None  # no callback: the Trainer's way
    assert neutral_resume_path(_trainer("fsdp", 2, auto), str(ckpt)) is None  # its own files, its size
    assert neutral_resume_path(_trainer("fsdp", 2, auto), None) is None
    assert neutral_resume_path(_trainer("fsdp", 4, auto), str(ckpt)) == neutral  # another world size
    assert neutral_resume_path(_trainer("deepspeed", 2, auto), str(ckpt)) == neutral  # another framework
    assert neutral_resume_path(_trainer("ddp", 2, auto), str(ckpt)) == neutral
    assert neutral_resume_path(_trainer("fsdp", 2, always), str(ckpt)) == neutral
    assert neutral_resume_path(_trainer("ddp", 2, never), str(ckpt)) is None
    (ckpt / "marsm_state" / "marsm_state.json").unlink()  # an unfinished save
    assert neutral_resume_path(_trainer("fsdp", 4, auto), str(ckpt)) is None  # the Trainer's own, then
    with pytest.raises(ValueError, match="neither this framework's optimizer state"):
        neutral_resume_path(_trainer("deepspeed", 2, auto), str(ckpt))


def _zero3_weights(rank: int, world_size: int, path: str) -> dict | None:
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                  "zero_optimization": {"stage": 3}}):
        model = tiny_gpt2(1)  # other weights than the file's
    assert all(hasattr(p, "ds_id") for p in model.parameters()) and model.transformer.wte.weight.numel() == 0
    load_full_weights(model, path)
    return full_weights(model)


@pytest.mark.distributed
def test_full_weights_go_into_and_out_of_zero3_partitions(run_ranks, tmp_path):
    """A model built under ``deepspeed.zero.Init`` (as ``from_pretrained`` builds it under ZeRO-3)
    takes the full weights partition by partition, and gives them back whole on rank 0."""
    pytest.importorskip("deepspeed")
    model = tiny_gpt2(0)
    want = full_weights(model)
    assert "lm_head.weight" not in want  # tied to the token embedding: kept once
    _write_weights(want, str(tmp_path))
    got, other = run_ranks(_zero3_weights, 2, str(tmp_path), timeout=120)
    assert other is None and sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def _bf16_deepspeed_recipe() -> None:
    """train_deepspeed.py's ZeRO-3 run in bf16, ZeRO keeping fp32 masters, always resuming from
    the neutral form. TrainingArguments refuses bf16 without a GPU (and would then turn DeepSpeed
    off), so the DeepSpeed config turns it on and the Trainer's check against its own flag is cleared."""
    from common import CountingSequences, LossLog, finish, parse_args
    from transformers import Trainer, TrainingArguments

    import marsm_dist.adapters.deepspeed  # noqa: F401

    args = parse_args(__doc__)
    config = json.loads((RECIPES / "ds_zero3.json").read_text())
    config["optimizer"]["params"]["ns_dtype"], config["bf16"] = "float32", {"enabled": True}
    training = TrainingArguments(output_dir=args.output_dir, max_steps=args.steps, save_steps=args.save_steps,
                                 per_device_train_batch_size=args.batch_size, logging_steps=1, seed=0,
                                 learning_rate=args.lr, weight_decay=0.1, lr_scheduler_type="constant",
                                 report_to="none", deepspeed=config)
    training.hf_deepspeed_config.mismatches.clear()
    losses = LossLog()
    trainer = Trainer(model=tiny_gpt2(0), args=training, train_dataset=CountingSequences(),
                      callbacks=[losses, MARSMCheckpointCallback(resume="neutral")])
    trainer.train(resume_from_checkpoint=args.resume)
    finish(args, losses)


@pytest.mark.distributed
@pytest.mark.slow
def test_bf16_deepspeed_resumes_from_its_fp32_masters(tmp_path):
    """model.safetensors holds the bf16 copies; marsm_state the fp32 masters ZeRO steps: with them
    the resume is bitwise the uninterrupted run, with the bf16 copies alone it is not."""
    straight, _ = _launch("deepspeed-bf16", tmp_path / "run", procs=2)
    ckpt = tmp_path / "run" / f"checkpoint-{SAVE_AT}"
    resumed, _ = _launch("deepspeed-bf16", tmp_path / "resumed", "--resume", str(ckpt), procs=2)
    assert resumed == {s: straight[s] for s in range(SAVE_AT + 1, STEPS + 1)}
    manifest = ckpt / "marsm_state" / "marsm_state.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "weights": False}))  # masters unread
    rounded, _ = _launch("deepspeed-bf16", tmp_path / "rounded", "--resume", str(ckpt), procs=2)
    assert max(abs(rounded[s] - straight[s]) for s in rounded) > 1e-5, (rounded, straight)


if __name__ == "__main__":  # tests/helpers/hf_cpu_run.py runs this file as the bf16 recipe
    from marsm_dist.shutdown import run_and_exit

    run_and_exit(_bf16_deepspeed_recipe)
