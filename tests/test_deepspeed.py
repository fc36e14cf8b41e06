"""MARSM under real DeepSpeed (CPU, gloo), switched on from the JSON config.

For ZeRO stages 0-3 the trajectory must match single-process MARSM on the same model and data:
ZeRO-1/2 hand the optimizer flat partitions that cut matrices mid-row and across ranks, ZeRO-3
partitions every parameter flat with padding, and the sharding engine must still orthogonalize
each whole matrix exactly once.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")

import marsm_dist.adapters.deepspeed  # noqa: E402,F401  (the one import users add)
from tests.helpers import fsdp2_models as fm  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
STEPS = 10


def config(stage: int, world_size: int, **extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": fm.GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19.8 would default to 1.0
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "MARSM", "params": {"lr": 0.02, "ns_dtype": "float32"}},
        "steps_per_print": 10**9,
    }
    cfg.update(extra)
    return cfg


def ds_env(rank: int, world_size: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))


def engine_for(rank, world_size, cfg, name="awkward"):
    ds_env(rank, world_size)
    model = fm.build(name)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, opt


def ds_train(engine, rank, world_size, steps, start=0, name="awkward", fixed=False):
    """``fixed``: the same batch every step (random tokens are only learnable by memorizing)."""
    lo, hi = rank * fm.GLOBAL_BATCH // world_size, (rank + 1) * fm.GLOBAL_BATCH // world_size
    losses = []
    for t in range(start, start + steps):
        x, y = fm.batch(name, 0 if fixed else t)
        loss = engine(x[lo:hi], y[lo:hi])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def full_params(engine) -> dict[str, torch.Tensor]:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op below ZeRO-3
        return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}


def trajectory_run(rank, world_size, stage, cfg_extra):
    engine, _ = engine_for(rank, world_size, config(stage, world_size, **cfg_extra))
    ds_train(engine, rank, world_size, STEPS)
    base = engine.optimizer.optimizer if stage else engine.optimizer
    flags = [hasattr(p, "use_muon") for p in engine.module.parameters()]
    return full_params(engine), type(base).__name__, any(flags)


@pytest.mark.parametrize(("stage", "world_size"), [(0, 2), (1, 2), (2, 2), (3, 2), (2, 3), (3, 3)])
def test_every_zero_stage_matches_single_process(stage, world_size):
    results = run_distributed(trajectory_run, world_size, stage, {})
    want = fm.reference("awkward", STEPS, approx=True, ns_dtype=torch.float32)
    for got, base, use_muon in results:
        assert base == "MARSM" and not use_muon
        for n in want:
            assert (got[n] - want[n]).abs().max() < 1e-5, (stage, n)


def client_run(rank, world_size, stage):
    """The other way in: a MARSM object passed to deepspeed.initialize (no optimizer block)."""
    from marsm_dist import MARSM, param_groups

    ds_env(rank, world_size)
    model = fm.build("awkward")
    cfg = config(stage, world_size)
    del cfg["optimizer"]
    opt = MARSM(param_groups(model, named=False), lr=0.02, ns_dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    ds_train(engine, rank, world_size, STEPS)
    return full_params(engine)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_marsm_object_works_as_a_client_optimizer(stage):
    want = fm.reference("awkward", STEPS, approx=True, ns_dtype=torch.float32)
    got = run_distributed(client_run, 2, stage)[0]
    for n in want:
        assert (got[n] - want[n]).abs().max() < 1e-5, n


def zero_init_run(rank, world_size):
    """ZeRO-3 with the model built under deepspeed.zero.Init: parameters are flat placeholders
    from the start, and routing must use their real shapes (ds_shape)."""
    ds_env(rank, world_size)
    cfg = config(3, world_size)
    with deepspeed.zero.Init(config_dict_or_path=cfg):
        model = fm.build("awkward")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ds_train(engine, rank, world_size, STEPS)
    return full_params(engine), shapes


def test_zero3_with_zero_init_routes_by_real_shapes():
    got, placeholder_shapes = run_distributed(zero_init_run, 2)[0]
    assert placeholder_shapes["a.weight"] != (30, 16)  # really flat placeholders
    want = fm.reference("awkward", STEPS, approx=True, ns_dtype=torch.float32)
    for n in want:
        assert (got[n] - want[n]).abs().max() < 1e-5, n


def json_run(rank, world_size, cfg):
    try:
        engine_for(rank, world_size, cfg)
    except Exception as err:  # noqa: BLE001 - the message is what the test checks
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_type_is_case_insensitive_and_bad_options_are_named():
    cfg = config(2, 2)
    cfg["optimizer"]["type"] = "marsm"
    assert run_distributed(json_run, 2, cfg) == ["ok", "ok"]
    cfg["optimizer"]["params"]["momentun"] = 0.9
    for message in run_distributed(json_run, 2, cfg):
        assert message.startswith("ValueError") and "'momentun'" in message
    cfg = config(1, 2)
    cfg["optimizer"]["params"]["approx"] = False
    for message in run_distributed(json_run, 2, cfg):
        assert "approx=False" in message


def clipped_run(rank, world_size):
    engine, _ = engine_for(rank, world_size, config(2, world_size, gradient_clipping=0.05))
    ds_train(engine, rank, world_size, 5)
    return full_params(engine)


def test_gradient_clipping_from_the_config_applies_before_marsm():
    got = run_distributed(clipped_run, 2)[0]
    model = fm.build("awkward")
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    for t in range(5):
        x, y = fm.batch("awkward", t)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert (got[n] - p.detach()).abs().max() < 1e-5, n


def overflow_run(rank, world_size, precision):
    if precision == "fp16":
        # The CPU accelerator says it has no fp16; DeepSpeed's loss-scaling logic runs fine on the
        # CPU regardless (test-only switch, never in the package).
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True
        extra = {"fp16": {"enabled": True, "initial_scale_power": 60, "loss_scale_window": 1000}}
    else:
        extra = {"bf16": {"enabled": True}}
    engine, _ = engine_for(rank, world_size, config(2, world_size, **extra))
    base = engine.optimizer.optimizer
    if precision == "bf16":  # an Inf gradient on rank 1 only
        engine.module.b.weight.register_hook(lambda g: g * float("inf") if rank == 1 else g)
    before = full_params(engine)
    ds_train(engine, rank, world_size, 1)  # fp16: loss * 2^60 overflows; bf16: the Inf above
    after = full_params(engine)
    return engine.optimizer.overflow, len(base.state), all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_overflow_step_leaves_marsm_untouched(precision):
    """DeepSpeed checks for overflow before it calls the optimizer: MARS-M never sees the step,
    so no state is created or changed (DeepSpeed's own Muon writes NaN into its momentum here)."""
    for overflow, n_state, unchanged in run_distributed(overflow_run, 2, precision):
        assert overflow and n_state == 0 and unchanged


def bf16_run(rank, world_size, stage):
    engine, _ = engine_for(rank, world_size, config(stage, world_size, bf16={"enabled": True}), name="gpt")
    return ds_train(engine, rank, world_size, 30, name="gpt", fixed=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_training_runs_and_the_loss_falls(stage):
    losses = run_distributed(bf16_run, 2, stage)[0]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses


def checkpoint_run(rank, world_size, stage, path):
    cfg = config(stage, world_size)
    straight, _ = engine_for(rank, world_size, cfg)
    ds_train(straight, rank, world_size, 8)
    want = full_params(straight)
    first, _ = engine_for(rank, world_size, cfg)
    ds_train(first, rank, world_size, 4)
    first.save_checkpoint(path, tag="step4")
    second, _ = engine_for(rank, world_size, cfg)
    second.load_checkpoint(path, tag="step4")
    ds_train(second, rank, world_size, 4, start=4)
    got = full_params(second)
    return max((got[n] - want[n]).abs().max().item() for n in want)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_checkpoint_resume_continues_the_same_trajectory(stage, tmp_path):
    for diff in run_distributed(checkpoint_run, 2, stage, str(tmp_path)):
        assert diff == 0.0


def stats_run(rank, world_size, stage):
    engine, _ = engine_for(rank, world_size, config(stage, world_size))
    base = engine.optimizer.optimizer if stage else engine.optimizer
    calls = []
    step = base.step

    def counted(*args, **kwargs):
        calls.append(len(base.param_groups))
        return step(*args, **kwargs)

    base.step = counted
    ds_train(engine, rank, world_size, 1)  # builds the plans

    def sent() -> int:  # every set of groups has its own plan and counters
        return sum(ctx.distributor.exchanged_bytes()[0] for ctx in base._step_maps.values())

    before, calls[:] = sent(), []
    ds_train(engine, rank, world_size, 1, start=1)
    s = base.last_step_stats
    return {"calls": len(calls), "stats_calls": s.calls, "sent": s.bytes_sent, "counted": sent() - before,
            "owned": s.owned_matrices, "ns_ms": s.milliseconds["newton_schulz"]}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_last_step_stats_cover_the_whole_engine_step(stage):
    """ZeRO's wrappers call ``step()`` once per param group (the MARS-M and the AdamW group):
    ``last_step_stats`` read after ``engine.step()`` adds up every call of that training step, not
    the last one (the AdamW group's: 0 bytes, no matrices)."""
    from marsm_dist import param_groups

    matrices = len(param_groups(fm.build("awkward"), named=False)[0]["params"])
    results = run_distributed(stats_run, 2, stage)
    for r in results:
        assert r["calls"] > 1 and r["stats_calls"] == r["calls"], r
        assert r["sent"] == r["counted"] > 0, r
    assert sum(r["owned"] for r in results) == matrices
    assert max(r["ns_ms"] for r in results) > 0
