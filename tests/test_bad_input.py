"""Bad input a user can write, table-driven: each case names the exception, words its message
must hold, and checks that parameters and optimizer state are exactly as they were.

Single process: values written into a param group after construction (a scheduler or a user).
Two ranks (FSDP2, gloo): a value that differs between ranks, and a value that is invalid on one
rank only; every rank must refuse the same step, before any exchange.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests import fsdp2_models as fm
from tests import problem
from tests.distributed import run_distributed
from tests.test_optimizer_api import assert_same, make, snapshot, train

# name -> (group key, value written into param group 0 after two steps, error type, words)
GROUP_VALUES = {
    "lr nan": ("lr", float("nan"), ValueError, ["lr", "param group 0", "nan"]),
    "lr inf": ("lr", math.inf, ValueError, ["lr", "param group 0"]),
    "momentum 1": ("momentum", 1.0, ValueError, ["momentum", "[0.0, 1.0)"]),
    "betas not a pair": ("adamw_betas", 0.9, ValueError, ["adamw_betas", "pair"]),
    "beta2 = 1": ("adamw_betas", (0.9, 1.0), ValueError, ["adamw_betas[1]"]),
    "ns_steps float": ("ns_steps", 5.0, ValueError, ["ns_steps", "int"]),
    "ns_dtype int": ("ns_dtype", torch.int32, ValueError, ["ns_dtype"]),
    "ns_form typo": ("ns_form", "gramm", ValueError, ["ns_form", "gramm"]),
    "coefficients short": ("ns_coefficients", (3.4, -4.7), ValueError, ["ns_coefficients"]),
    "approx not a bool": ("approx", 1, ValueError, ["approx"]),
}


@pytest.mark.parametrize("case", list(GROUP_VALUES))
def test_a_bad_group_value_written_after_construction_is_refused_and_changes_nothing(case):
    key, value, error, words = GROUP_VALUES[case]
    params, opt = make()
    train(params, opt, 2)
    opt.param_groups[0][key] = value
    problem.loss(params, 2).backward()
    before = snapshot(params, opt)
    with pytest.raises(error) as info:
        opt.step()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert "left untouched" in str(info.value)
    opt.param_groups[0][key] = before[1]["param_groups"][0][key]  # (the snapshot holds the good one)
    assert_same(snapshot(params, opt), before)


def test_lists_where_tuples_belong_are_taken_back_as_tuples():
    """What a JSON config or a state-dict round trip gives: the step runs, and the group holds tuples."""
    params, opt = make()
    opt.param_groups[0]["adamw_betas"] = [0.9, 0.95]
    opt.param_groups[0]["ns_coefficients"] = [3.4445, -4.7750, 2.0315]
    train(params, opt, 1)
    assert isinstance(opt.param_groups[0]["adamw_betas"], tuple)
    assert isinstance(opt.param_groups[0]["ns_coefficients"], tuple)


# name -> (rank, key, value written on that rank only, words on the writing rank, on the others)
RANK_VALUES = {
    "lr differs": (1, "lr", 0.021, ["'lr' differs between ranks"], ["'lr' differs between ranks"]),
    "ns_dtype differs": (1, "ns_dtype", torch.bfloat16, ["'ns_dtype' differs"], ["'ns_dtype' differs"]),
    "ns_steps differs": (0, "ns_steps", 4, ["'ns_steps' differs"], ["'ns_steps' differs"]),
    "approx differs": (1, "approx", False, ["no look-ahead gradient stored"], ["another rank refused"]),
    "momentum 1 on one rank": (1, "momentum", 1.0, ["Invalid momentum"], ["another rank refused"]),
}


def local_copy(model, opt) -> tuple[dict, dict]:
    """This rank's shards of the parameters and of every state value, copied."""
    def own(v):
        v = v.to_local() if hasattr(v, "to_local") else v
        return v.detach().clone() if torch.is_tensor(v) else copy.copy(v)

    return ({n: own(p) for n, p in model.named_parameters()},
            {i: {k: own(v) for k, v in st.items()} for i, st in enumerate(opt.state.values())})


def rank_value_run(rank, world_size, case):
    who, key, value, _, _ = RANK_VALUES[case]
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    fm.train("awkward", model, opt, 2, approx=True, rank=rank, world_size=world_size)
    good = opt.param_groups[0][key]
    if rank == who:
        opt.param_groups[0][key] = value
    x, y = fm.batch("awkward", 2)
    lo, hi = rank * fm.GLOBAL_BATCH // world_size, (rank + 1) * fm.GLOBAL_BATCH // world_size
    model(x[lo:hi], y[lo:hi]).backward()
    before = local_copy(model, opt)
    try:
        opt.step()
        message = "no error"
    except (ValueError, RuntimeError) as err:
        message = str(err)
    opt.param_groups[0][key] = good
    after = local_copy(model, opt)
    unchanged = all(torch.equal(before[0][n], after[0][n]) for n in before[0]) and all(
        torch.equal(v, after[1][i][k]) if torch.is_tensor(v) else v == after[1][i][k]
        for i, st in before[1].items() for k, v in st.items())
    # The run goes on once the value is put right: the refused step left nothing half-done.
    opt.step()
    return message, unchanged


@pytest.mark.parametrize("case", list(RANK_VALUES))
def test_ranks_that_disagree_all_refuse_the_step(case):
    who, _, _, words_writer, words_others = RANK_VALUES[case]
    for rank, (message, unchanged) in enumerate(run_distributed(rank_value_run, 2, case, timeout=120)):
        for word in words_writer if rank == who else words_others:
            assert word in message, (rank, message)
        assert "left untouched" in message and unchanged, (rank, message)
