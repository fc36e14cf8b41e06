"""``lr_scale`` and ``ns_coefficients`` sharded and from every framework's configuration: FSDP2 and
DeepSpeed (from its JSON) against the single-process optimizer; Megatron's flags and torchtitan's
config select them. (Rank agreement: tests/test_bad_input.py; state_dict: tests/test_ns_options.py.)"""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from marsm_dist import MARSM
from marsm_dist.ns_coefficients import NS_PRESETS
from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed

STEPS = 6
OPTIONS = {"lr_scale": "muon", "ns_coefficients": "polar_express"}
# A schedule as a JSON file gives it: lists of lists.
SCHEDULE = [list(t) for t in NS_PRESETS["polar_express"][:4]]


def max_diff(got, want):
    assert got.keys() == want.keys()
    return max((got[n] - want[n]).abs().max().item() for n in got)


def fsdp2_run(rank, world_size, kw):
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, approx=True, **kw)
    fm.train("awkward", model, opt, STEPS, approx=True, rank=rank, world_size=world_size)
    return fm.full_params(model)


@pytest.mark.distributed
@pytest.mark.parametrize("kw", [OPTIONS, {"lr_scale": "spectral", "ns_coefficients": SCHEDULE}],
                         ids=["muon+polar_express", "spectral+schedule"])
def test_fsdp2_steps_with_the_options_as_one_process_does(kw):
    kw = {**kw, "ns_dtype": torch.float32}
    want = fm.reference("awkward", STEPS, approx=True, **kw)
    default = fm.reference("awkward", STEPS, approx=True, ns_dtype=torch.float32)
    assert max_diff(want, default) > 1e-3  # the options change the run (the test can fail)
    for got in run_distributed(fsdp2_run, 2, kw, timeout=180):
        assert max_diff(got, want) < 1e-5


def deepspeed_run(rank, world_size, params):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import marsm_dist.adapters.deepspeed  # noqa: F401
    from tests.test_deepspeed import config, ds_env, ds_train, full_params

    ds_env(rank, world_size)
    cfg = config(2, world_size)
    cfg["optimizer"]["params"].update(params)
    model = fm.build("awkward")
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ds_train(engine, rank, world_size, STEPS)
    group = engine.optimizer.optimizer.param_groups[0]
    return full_params(engine), group["lr_scale"], group["ns_coefficients"]


@pytest.mark.distributed
def test_deepspeed_json_selects_the_options():
    pytest.importorskip("deepspeed")
    params = {"lr_scale": "match_rms_adamw", "ns_coefficients": SCHEDULE}
    want = fm.reference("awkward", STEPS, approx=True, ns_dtype=torch.float32, **params)
    for got, scale, coefficients in run_distributed(deepspeed_run, 2, params, timeout=240):
        assert scale == "match_rms_adamw" and coefficients == tuple(map(tuple, SCHEDULE))
        assert max_diff(got, want) < 1e-5


def test_megatron_flags_select_the_options():
    args_mod = pytest.importorskip("marsm_dist.adapters.megatron.args")
    parser = args_mod.add_marsm_args(argparse.ArgumentParser())
    words = ["--marsm-lr-scale", "spectral", "--marsm-ns-coefficients", "polar_express"]
    kwargs = args_mod.marsm_kwargs_from_args(parser.parse_args(words))
    assert kwargs["lr_scale"] == "spectral" and kwargs["ns_coefficients"] == "polar_express"
    numbers = "--marsm-ns-coefficients 3 -4 2 2 -1.5 0.5".split()
    kwargs = args_mod.marsm_kwargs_from_args(parser.parse_args(numbers))
    assert kwargs["ns_coefficients"] == ((3.0, -4.0, 2.0), (2.0, -1.5, 0.5))
    kwargs.pop("split_qkv")
    opt = MARSM([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_marsm": True}], **kwargs)
    assert opt.param_groups[0]["lr_scale"] == "mars_m"
    with pytest.raises(ValueError, match="threes"):
        args_mod.marsm_kwargs_from_args(parser.parse_args("--marsm-ns-coefficients 1 2".split()))


def test_torchtitan_config_selects_the_options():
    pytest.importorskip("torchtitan")
    from marsm_dist.adapters.torchtitan import MARSMContainer
    from tests.test_torchtitan import build

    cfg = MARSMContainer.Config(lr=0.02, ns_dtype="float32", **OPTIONS)
    container = cfg.build(model_parts=[build(0)])
    groups = container.optimizers[0].param_groups
    assert {(g["lr_scale"], g["ns_coefficients"]) for g in groups} == {("muon", "polar_express")}
