"""MARSM as a torch.optim.Optimizer: validation, routing, bad gradients, modes, state_dict."""

from __future__ import annotations

import pytest
import torch

from marsm_dist import MARSM, NonFiniteGradError
from tests.helpers import problem
from tests.helpers.optimizer_runs import assert_same, make, snapshot, train

BAD_ARGS = [
    ("lr", -1e-3), ("weight_decay", -0.1), ("momentum", 1.0), ("momentum", -0.1),
    ("gamma", -0.5), ("ns_steps", 0), ("ns_steps", 2.5), ("ns_dtype", torch.int32),
    ("ns_dtype", "float8"), ("adamw_betas", (0.9,)), ("adamw_betas", (0.9, 1.0)),
    ("adamw_eps", -1e-8), ("approx", "yes"), ("lr", float("nan")),
    ("ns_coefficients", (1.0, 2.0)), ("on_nonfinite", "ignore"), ("flatten", 1),
    ("overlap", "yes"), ("ns_team_max", 3), ("ns_team_max", 0), ("ns_team_max", True),
]


@pytest.mark.parametrize(("name", "value"), BAD_ARGS, ids=[f"{n}={v}" for n, v in BAD_ARGS])
def test_invalid_hyperparameters_name_the_argument(name, value):
    p = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=name.split("[")[0]):
        MARSM([p], **{name: value})


def test_invalid_group_value_names_the_group():
    a, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"Invalid momentum in param group 1"):
        MARSM([{"params": [a]}, {"params": [b], "momentum": 1.5}])
    opt = MARSM([a])
    with pytest.raises(ValueError, match=r"Invalid lr in param group 1"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    assert len(opt.param_groups) == 1  # the refused group is not left half-added
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


def test_use_marsm_on_a_vector_is_refused_by_name():
    w, b = torch.nn.Parameter(torch.zeros(3, 3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="'fc.bias'"):
        MARSM([{"params": [("fc.weight", w), ("fc.bias", b)], "use_marsm": True}])


def test_sparse_and_complex_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MARSM([{"params": emb.parameters(), "use_marsm": False}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        MARSM([torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))])


@pytest.mark.parametrize("approx", [True, False])
@pytest.mark.parametrize("where", ["square", "embedding", "bias"])
def test_nonfinite_grad_raises_naming_the_parameter_and_changes_nothing(approx, where):
    params, opt = make(approx=approx)
    train(params, opt, 3, approx=approx)
    before = snapshot(params, opt)
    if not approx:
        problem.loss(params, 4).backward()
        opt.store_lookahead_grad()
        opt.zero_grad()
    problem.loss(params, 3).backward()
    params[where].grad.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteGradError, match=f"gradient of '{where}'"):
        opt.step()
    after = snapshot(params, opt)
    for n in params:
        assert torch.equal(before[0][n], after[0][n]), n
    # Every state tensor is untouched (exact mode: the freshly stored look-ahead differs, by design).
    for i, st in before[1]["state"].items():
        for k in ("exp_avg", "last_grad", "exp_avg_sq", "step"):
            if k in st:
                assert torch.equal(st[k], after[1]["state"][i][k]), (i, k)


def test_nonfinite_lookahead_is_caught_before_it_becomes_p():
    params, opt = make(approx=False)
    problem.loss(params, 1).backward()
    params["tall"].grad[0, 0] = float("inf")
    opt.store_lookahead_grad()
    opt.zero_grad()
    problem.loss(params, 0).backward()
    with pytest.raises(NonFiniteGradError, match="look-ahead gradient of 'tall'"):
        opt.step()


def test_skip_mode_skips_the_step_as_if_it_never_happened():
    params, opt = make(on_nonfinite="skip")
    train(params, opt, 3)
    problem.loss(params, 3).backward()
    params["wide"].grad.fill_(float("inf"))
    opt.step()
    opt.zero_grad()
    assert opt.skipped_steps == 1
    train(params, opt, 3, start=3)
    ref_params, ref_opt = make()
    train(ref_params, ref_opt, 6)
    assert_same(snapshot(params, opt), snapshot(ref_params, ref_opt))


def test_huge_but_finite_grads_are_clipped_not_mistaken_for_overflow():
    """||g||^2 overflows float32 here; the clip must still scale c to unit norm, so the step is
    the same as for g = ones (also clipped, same direction)."""
    huge, ones = torch.nn.Parameter(torch.eye(4)), torch.nn.Parameter(torch.eye(4))
    opts = [MARSM([p], ns_dtype=torch.float32) for p in (huge, ones)]
    huge.grad, ones.grad = torch.full((4, 4), 1e30), torch.ones(4, 4)
    for opt in opts:
        opt.step()
    assert torch.allclose(huge, ones, atol=1e-6, rtol=0) and not torch.equal(huge, torch.eye(4))


def test_c_t_overflowing_float32_is_refused_not_applied():
    """g is finite but (1 + kappa) g is not: refusing beats writing Inf into the momentum."""
    p = torch.nn.Parameter(torch.eye(3))
    opt = MARSM([("w", p)], ns_dtype=torch.float32)
    p.grad = torch.full((3, 3), 3e38)
    with pytest.raises(NonFiniteGradError, match="c_t of 'w' .overflow"):
        opt.step()
    assert torch.equal(p, torch.eye(3)) and not opt.state[p]["exp_avg"].any()


def test_exact_mode_demands_a_lookahead_before_each_step():
    params, opt = make(approx=False)
    problem.loss(params, 0).backward()
    with pytest.raises(RuntimeError, match="store_lookahead_grad"):
        opt.step()
    _, approx_opt = make(approx=True)
    with pytest.raises(RuntimeError, match="approx=False"):
        approx_opt.store_lookahead_grad()


def test_p_is_a_copy_not_an_alias_of_grad():
    params, opt = make()
    problem.loss(params, 0).backward()
    opt.step()
    for n in problem.MATRIX:
        st = opt.state[params[n]]
        assert st["last_grad"].data_ptr() != params[n].grad.data_ptr()
        assert torch.equal(st["last_grad"], params[n].grad)


def test_per_group_hyperparameters_equal_separate_optimizers():
    """Matrices are updated independently, so one optimizer with per-group settings must equal
    two optimizers that each hold one group's settings as defaults."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(6, 4), torch.randn(3, 5)
    a1, a2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    b1, b2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    opt = MARSM([{"params": [a1]}, {"params": [a2], "lr": 0.05, "momentum": 0.8, "gamma": 0.1,
                                     "weight_decay": 0.0, "ns_steps": 3}], lr=0.01,
                ns_dtype=torch.float32)
    o1 = MARSM([b1], lr=0.01, ns_dtype=torch.float32)
    o2 = MARSM([b2], lr=0.05, momentum=0.8, gamma=0.1, weight_decay=0.0, ns_steps=3,
               ns_dtype=torch.float32)
    for t in range(4):
        x = torch.randn(4) * (t + 1)
        for (p, q), opts in (((a1, a2), [opt]), ((b1, b2), [o1, o2])):
            (torch.tanh(p @ x).sum() + torch.sin(q).sum() * x.sum()).backward()
            for o in opts:
                o.step()
                o.zero_grad()
    assert torch.equal(a1, b1) and torch.equal(a2, b2)


def test_maximize_equals_minimizing_the_negated_loss():
    p1, o1 = make(maximize=True)
    p2, o2 = make()
    for t in range(3):
        (-problem.loss(p1, t)).backward()
        problem.loss(p2, t).backward()
        for o in (o1, o2):
            o.step()
            o.zero_grad()
    assert_same(snapshot(p1, o1), snapshot(p2, o2))


def test_ns_dtype_by_name_and_param_names_in_state_dict():
    params, opt = make(ns_dtype="float32")
    assert opt.param_groups[0]["ns_dtype"] is torch.float32
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["square", "tall"]


@pytest.mark.parametrize("approx", [True, False])
def test_init_state_creates_every_key_up_front_and_changes_nothing(approx):
    params, opt = make(approx=approx)
    opt.init_state()
    sd = opt.state_dict()
    assert sorted(sd["state"]) == list(range(len(problem.SHAPES)))
    keys = {frozenset(s) for s in sd["state"].values()}
    matrix = {"step", "exp_avg", "last_grad"} | (set() if approx else {"lookahead_grad", "lookahead_ready"})
    assert keys == {frozenset(matrix), frozenset({"step", "exp_avg", "exp_avg_sq"})}
    train(params, opt, 3, approx=approx)
    ref_params, ref_opt = make(approx=approx)
    train(ref_params, ref_opt, 3, approx=approx)
    assert_same(snapshot(params, opt), snapshot(ref_params, ref_opt))


@pytest.mark.parametrize("approx", [True, False])
def test_state_dict_round_trip_continues_bit_identically(approx):
    params, opt = make(approx=approx)
    train(params, opt, 5, approx=approx)
    saved = snapshot(params, opt)
    train(params, opt, 5, start=5, approx=approx)

    params2 = {n: p.clone().requires_grad_() for n, p in saved[0].items()}
    opt2 = MARSM(problem.groups(params2), lr=0.123, approx=approx)  # hyperparameters come back too
    opt2.load_state_dict(state_dict=saved[1])  # by keyword, as torch.distributed.checkpoint calls it
    assert opt2.param_groups[0]["lr"] == problem.BASE_LR
    assert opt2.param_groups[0]["ns_dtype"] is torch.float32
    train(params2, opt2, 5, start=5, approx=approx)
    assert_same(snapshot(params, opt), snapshot(params2, opt2))


def test_last_step_stats_add_up_the_calls_of_one_step_only():
    """One call per step: each step's figures stand alone. A framework that swaps ``param_groups``
    for each call (as DeepSpeed's ZeRO wrappers do) gets the calls of one step added up, and a
    call stepping a parameter stepped already starts the next step."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(6))
    w.grad, b.grad = torch.randn(8, 6), torch.randn(6)
    opt = MARSM([{"params": [w], "use_marsm": True}, {"params": [b], "use_marsm": False}])
    for _ in range(3):
        opt.step()
        assert opt.last_step_stats.calls == 1 and opt.last_step_stats.ns_flops_this_rank > 0
    groups = opt.param_groups
    for _ in range(2):  # two training steps, each one call per group: the first starts anew
        flops = []
        for group in groups:
            opt.param_groups = [group]
            opt.step()
            flops.append(opt.last_step_stats.ns_flops_this_rank)
        assert opt.last_step_stats.calls == 2
        assert flops[0] > 0 and flops[1] == flops[0]  # the AdamW call adds no Newton-Schulz
    opt.param_groups = groups
