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

from tests.helpers import fsdp2_models as fm
from tests.helpers import problem
from tests.helpers.distributed import run_distributed
from tests.helpers.optimizer_runs import assert_same, make, snapshot, train

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
    "lr_scale differs": (1, "lr_scale", "muon", ["'lr_scale' differs"], ["'lr_scale' differs"]),
    "ns_coefficients differs": (0, "ns_coefficients", "polar_express", ["'ns_coefficients' differs"],
                                ["'ns_coefficients' differs"]),
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


def backward_on_my_slice(model, rank: int, world_size: int, t: int) -> None:
    """Gradients of step ``t``'s batch, this rank's slice (FSDP2 averages them)."""
    x, y = fm.batch("awkward", t)
    lo, hi = rank * fm.GLOBAL_BATCH // world_size, (rank + 1) * fm.GLOBAL_BATCH // world_size
    model(x[lo:hi], y[lo:hi]).backward()


def rank_value_run(rank, world_size, case):
    who, key, value, _, _ = RANK_VALUES[case]
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    fm.train("awkward", model, opt, 2, approx=True, rank=rank, world_size=world_size)
    good = opt.param_groups[0][key]
    if rank == who:
        opt.param_groups[0][key] = value
    backward_on_my_slice(model, rank, world_size, 2)
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


def _adamw_state_dict():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4, 4)
    opt.step()
    return opt.state_dict()


def _other_model_state_dict():
    from marsm_dist import MARSM

    p = torch.nn.Parameter(torch.randn(4, 1))  # the table's model has a (4, 4) matrix here
    opt = MARSM([p, torch.nn.Parameter(torch.randn(4))])
    opt.init_state()
    return opt.state_dict()


def _with_nan_state():
    params, opt = _small()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_sq"][2] = float("nan")
    return sd


def _small():
    from marsm_dist import MARSM

    params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = MARSM(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


# name -> (what to build (kwargs or a state dict to load), error type, words)
CONSTRUCTION = {
    "integer parameter": ({"params": [torch.zeros(3, 3, dtype=torch.int64)]}, ValueError,
                          ["floating-point", "int64"]),
    "same tensor twice": ("duplicate", ValueError, ["same tensor", "once"]),
    "same tensor twice, named": ("named duplicate", ValueError, ["'b' is the same tensor as 'a'"]),
    "float8 ns_dtype": ({"ns_dtype": torch.float8_e4m3fn}, ValueError, ["ns_dtype", "float8"]),
    "betas a scalar": ({"adamw_betas": 0.9}, ValueError, ["adamw_betas", "pair"]),
    "coefficients a scalar": ({"ns_coefficients": 3.0}, ValueError, ["ns_coefficients"]),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION))
def test_construction_refuses_what_can_never_work(case):
    from marsm_dist import MARSM

    spec, error, words = CONSTRUCTION[case]
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(error) as info:
        if spec == "duplicate":
            MARSM([w, w])
        elif spec == "named duplicate":
            MARSM([("a", w), ("b", w)])
        else:
            MARSM(spec.get("params", [w]), **{k: v for k, v in spec.items() if k != "params"})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


LOADING = {
    "torch.optim.AdamW's state dict": (_adamw_state_dict, ValueError, ["another optimizer", "'momentum'"]),
    "another model's state dict": (_other_model_state_dict, ValueError,
                                   ["(4, 1)", "(4, 4)", "differently shaped"]),
}


@pytest.mark.parametrize("case", list(LOADING))
def test_loading_refuses_a_state_dict_that_cannot_work_and_changes_nothing(case):
    make_sd, error, words = LOADING[case]
    params, opt = _small()
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(error) as info:
        opt.load_state_dict(make_sd())
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    after = opt.state_dict()
    for i, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]


def test_nan_in_a_loaded_state_dict_is_named_and_changes_nothing():
    from marsm_dist import NonFiniteGradError

    params, opt = _small()
    opt.load_state_dict(_with_nan_state())
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(NonFiniteGradError, match="optimizer state 'exp_avg_sq'.*loaded state dict"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))


def test_zero_size_matrices_are_skipped():
    """A (0, 8) matrix beside normal ones: the step runs, and the others move as without it."""
    from marsm_dist import MARSM

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4))
    empty = torch.nn.Parameter(torch.randn(0, 8))
    twin = torch.nn.Parameter(w.detach().clone())
    opt, ref = MARSM([w, empty], ns_dtype=torch.float32), MARSM([twin], ns_dtype=torch.float32)
    for _ in range(3):
        g = torch.randn(4, 4)
        w.grad, empty.grad, twin.grad = g.clone(), torch.zeros(0, 8), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(w, twin)


def test_a_checkpoint_of_the_other_mode_brings_its_mode():
    """Documented: the checkpoint's hyperparameters replace the current ones, approx included
    (torch.optim semantics); an approx=True checkpoint steps on without a look-ahead."""
    from marsm_dist import MARSM

    params, opt = _small()  # approx=True
    exact = MARSM(params, approx=False)
    exact.load_state_dict(opt.state_dict())
    assert exact.param_groups[0]["approx"] is True
    for p in params:
        p.grad = torch.randn_like(p)
    exact.step()


def nan_state_run(rank, world_size):
    from marsm_dist import NonFiniteGradError

    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    fm.train("awkward", model, opt, 2, approx=True, rank=rank, world_size=world_size)
    opt.load_state_dict(opt.state_dict())  # (as a resume does)
    if rank == 1:
        opt.state[model.a.weight]["exp_avg"].to_local().view(-1)[0] = float("nan")
    backward_on_my_slice(model, rank, world_size, 2)
    before = local_copy(model, opt)
    try:
        opt.step()
        return "no error", False
    except NonFiniteGradError as err:
        after = local_copy(model, opt)
        same = all(torch.equal(before[0][n], after[0][n]) for n in before[0])
        return str(err), same


def test_nan_in_one_ranks_loaded_state_stops_every_rank():
    messages = run_distributed(nan_state_run, 2, timeout=120)
    assert "optimizer state 'exp_avg'" in messages[1][0] and "'a.weight'" in messages[1][0]
    assert "another rank" in messages[0][0]
    assert all(same for _, same in messages)


def test_a_new_tensor_that_reuses_an_id_never_gets_the_old_plan():
    """Cached plans are for the very tensors they were built for: one found under the same ids
    (a replaced, resized parameter whose new tensor got the freed id) is rebuilt, not reused."""
    from marsm_dist import MARSM

    old = torch.nn.Parameter(torch.randn(4, 4))
    opt = MARSM([old])
    old.grad = torch.randn(4, 4)
    opt.step()
    stale = opt._step_map
    new = torch.nn.Parameter(torch.randn(6, 3))  # resized
    opt.param_groups[0]["params"] = [new]
    opt._step_maps[stale.key_of(opt.param_groups)] = stale  # as if `new` had reused old's id
    new.grad = torch.randn(6, 3)
    opt.step()
    assert opt._step_map is not stale and opt._step_map.slot_lists[id(new)][0].shape == (6, 3)


def test_an_optimizer_whose_parameters_never_get_gradients_warns_once():
    from marsm_dist import MARSM

    model = torch.nn.Linear(4, 4)
    opt = MARSM(model.parameters())
    model.weight = torch.nn.Parameter(model.weight.detach().clone())  # replaced after construction
    model.bias = torch.nn.Parameter(model.bias.detach().clone())
    model(torch.randn(2, 4)).sum().backward()
    with pytest.warns(UserWarning, match="none of the optimizer's parameters has a gradient.*wrapped"):
        opt.step()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once


def test_an_unknown_keyword_gets_marsms_own_error_with_the_likely_name():
    from marsm_dist import MARSM

    p = [torch.nn.Parameter(torch.randn(3, 3))]
    with pytest.raises(TypeError, match=r"\['betas'\].*did you mean 'adamw_betas'.*valid: \['lr'"):
        MARSM(p, betas=(0.9, 0.95))
    with pytest.raises(TypeError, match="did you mean 'weight_decay'"):
        MARSM(p, weight_decy=0.1)
    with pytest.raises(TypeError, match="'nesterov': MARS-M has no such option"):
        MARSM(p, nesterov=True)
    MARSM(p, adamw_betas=(0.9, 0.95))  # the right name still works


def test_bare_tensors_routed_by_shape_warn_and_name_param_groups():
    import warnings

    from marsm_dist import MARSM, param_groups

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"bare tensors.*embedding.*param_groups\(model\)"):
        MARSM(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MARSM(param_groups(model))  # routed by name: no warning
        MARSM([{"params": list(model.parameters()), "use_marsm": False}])  # routed by the user


def test_a_head_with_another_name_is_routed_by_head_names():
    from marsm_dist import param_groups

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)
            self.out = torch.nn.Linear(4, 10)

    def routed(**kw):
        return {n: g["use_marsm"] for g in param_groups(Net(), **kw) for n, _ in g["params"]}

    assert routed()["out.weight"] is True  # not a known head name: a hidden matrix
    assert routed(head_names=("out",))["out.weight"] is False and routed()["body.weight"] is True
