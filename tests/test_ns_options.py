"""The Newton-Schulz coefficient schedules (``ns_coefficients``) and the update scale (``lr_scale``).

References: a float64 loop written here from the Polar Express paper's Algorithm 1 (its own
normalization by 1.01 ||X||_F, its safety factors), an SVD's U V^T, and update scales computed by
hand from the shapes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from marsm_dist import MARSM
from marsm_dist.newton_schulz import newton_schulz, newton_schulz_columns
from marsm_dist.ns_coefficients import (
    NS_COEFFICIENTS,
    NS_PRESETS,
    coefficient_schedule,
    coefficients_for_steps,
    parse_coefficients,
)

# Arxiv 2505.16932, Algorithm 1, as printed (before its safety factors).
PAPER = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
         (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
         (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
         (3.3184196573706015, -2.488488024314874, 0.51004894012372),
         (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
         (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
         (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
         (1.875, -1.25, 0.375)]


def paper_polar_express(G: torch.Tensor, steps: int) -> torch.Tensor:
    """The paper's Algorithm 1 in float64: its normalization, its safety factor on all but the last."""
    coeffs = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in PAPER[:-1]] + [PAPER[-1]]
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    X = X.mT if tall else X
    X = X / (X.norm() * 1.01 + 1e-7)
    for k in range(steps):
        a, b, c = coeffs[min(k, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def rel_err(X: torch.Tensor, ref: torch.Tensor) -> float:
    return ((X.double() - ref).norm() / ref.norm()).item()


def test_every_way_of_writing_a_schedule_comes_to_one_canonical_form():
    assert coefficient_schedule(NS_COEFFICIENTS) == coefficient_schedule("quintic") == (NS_COEFFICIENTS,)
    assert coefficient_schedule([list(NS_COEFFICIENTS)] * 2) == (NS_COEFFICIENTS,) * 2
    assert len(coefficient_schedule("polar_express")) == 8
    # The last triple repeats once the list runs out; a longer list is cut.
    three = [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0), (7.0, 8.0, 9.0)]
    assert coefficients_for_steps(three, 5) == tuple(three) + ((7.0, 8.0, 9.0),) * 2
    assert coefficients_for_steps(three, 2) == tuple(three[:2])
    assert parse_coefficients(["polar_express"]) == "polar_express"
    assert parse_coefficients("3.4445 -4.775 2.0315".split()) == (3.4445, -4.775, 2.0315)
    assert parse_coefficients("1 2 3 4 5 6".split()) == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    for bad in ("polar", (1.0, 2.0), [], [(1.0, 2.0, 3.0), (1.0, 2.0)], (1.0, float("nan"), 2.0), 3.0):
        with pytest.raises(ValueError, match="preset"):
            coefficient_schedule(bad)
    with pytest.raises(ValueError, match="threes"):
        parse_coefficients(["1", "2"])


def test_a_schedule_of_the_same_triple_is_the_single_triple_bit_for_bit():
    torch.manual_seed(0)
    G = torch.randn(96, 160)
    for dtype in (torch.float32, torch.bfloat16):
        one = newton_schulz(G, 5, dtype=dtype)
        assert torch.equal(one, newton_schulz(G, 5, dtype=dtype, coefficients=[NS_COEFFICIENTS] * 5))
        assert torch.equal(one, newton_schulz(G, 5, dtype=dtype, coefficients="quintic"))


@pytest.mark.parametrize("shape", [(128, 384), (384, 128), (200, 200)])
@pytest.mark.parametrize("form", ["plain", "gram"])
def test_polar_express_follows_the_papers_algorithm(shape, form):
    """The preset (the paper's 1.01 normalization folded into the first triple) in float32, plain
    and Gram forms, against the paper's own loop in float64."""
    torch.manual_seed(1)
    G = torch.randn(*shape)
    for steps in (5, 10):
        got = newton_schulz(G, steps, dtype=torch.float32, coefficients="polar_express", form=form)
        assert rel_err(got, paper_polar_express(G, steps)) < 2e-5, steps


def test_polar_express_is_closer_to_orthogonal_than_the_quintic():
    """Against U V^T from an SVD: the quintic plateaus (singular values land in about [0.7, 1.2]),
    Polar Express keeps converging (the numbers are in docs/usage.md)."""
    torch.manual_seed(2)
    G = torch.randn(256, 768)
    ref = polar(G)
    for dtype in (torch.float32, torch.bfloat16):
        quintic = rel_err(newton_schulz(G, 5, dtype=dtype), ref)
        express = rel_err(newton_schulz(G, 5, dtype=dtype, coefficients="polar_express"), ref)
        assert express < 0.6 * quintic, (dtype, express, quintic)
    assert rel_err(newton_schulz(G, 8, dtype=torch.float32, coefficients="polar_express"), ref) < 1e-2


def test_the_split_form_takes_the_schedule_too():
    torch.manual_seed(3)
    X = torch.randn(64, 192)
    whole = newton_schulz(X, 5, dtype=torch.float32, coefficients="polar_express", form="plain")
    block = newton_schulz_columns(X, 5, dtype=torch.float32, coefficients="polar_express")
    assert (whole - block).abs().max().item() < 1e-5


def one_step(**kw) -> tuple[torch.Tensor, torch.Tensor, MARSM]:
    """W and W after one MARSM step on fixed gradients (float32 Newton-Schulz)."""
    torch.manual_seed(4)
    ws = [torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(8, 12))]
    for w in ws:
        w.grad = torch.randn_like(w)
    before = [w.detach().clone() for w in ws]
    opt = MARSM([{"params": ws, "use_marsm": True}], lr=0.01, weight_decay=0.1, ns_dtype=torch.float32, **kw)
    opt.step()
    return before, [w.detach().clone() for w in ws], opt


SCALES = {  # s for (12, 8) and (8, 12), by hand
    "mars_m": (0.2 * math.sqrt(12), 0.2 * math.sqrt(12)),
    "match_rms_adamw": (0.2 * math.sqrt(12), 0.2 * math.sqrt(12)),
    "muon": (math.sqrt(1.5), 1.0),
    "spectral": (math.sqrt(1.5), math.sqrt(8 / 12)),
}


def _times_three_rows(shape: tuple[int, int]) -> float:
    return 3.0 * shape[0]


@pytest.mark.parametrize("rule", [*SCALES, "callable"])
def test_each_lr_scale_scales_the_orthogonal_update_and_nothing_else(rule):
    """W1 - W0 (1 - lr wd) = -lr s O: the rule's s against the default's, per matrix."""
    w0, mars, _ = one_step()
    _, got, opt = one_step(lr_scale=_times_three_rows if rule == "callable" else rule)
    want = (36.0, 24.0) if rule == "callable" else SCALES[rule]
    for k in range(2):
        decayed = w0[k] * (1 - 0.01 * 0.1)
        ratio = (got[k] - decayed).norm() / (mars[k] - decayed).norm()
        assert ratio.item() == pytest.approx(want[k] / SCALES["mars_m"][k], rel=1e-5), (rule, k)
    assert opt.param_groups[0]["lr_scale"] is not None


def test_an_lr_scale_that_fails_leaves_the_step_untouched():
    for bad, words in [(lambda shape: float("nan"), "positive finite"), (lambda shape: 1 / 0, "division")]:
        torch.manual_seed(5)
        w = torch.nn.Parameter(torch.randn(6, 4))
        w.grad = torch.randn_like(w)
        opt = MARSM([{"params": [w], "use_marsm": True}], lr_scale=bad)
        before = w.detach().clone()
        with pytest.raises((ValueError, ZeroDivisionError), match=words):
            opt.step()
        assert torch.equal(w, before) and all(not s for s in opt.state.values()) or all(
            float(s["step"]) == 0 for s in opt.state.values())


@pytest.mark.parametrize("bad", ["rms", 0.2, None])
def test_a_wrong_lr_scale_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="lr_scale"):
        MARSM([torch.nn.Parameter(torch.randn(4, 4))], lr_scale=bad)


def test_adjust_lr_fn_points_to_lr_scale():
    with pytest.raises(TypeError, match="did you mean 'lr_scale'"):
        MARSM([torch.nn.Parameter(torch.randn(4, 4))], adjust_lr_fn="match_rms_adamw")


def test_options_round_trip_through_state_dict_and_json_lists():
    """A schedule saved as lists (JSON, a DCP round trip) loads as tuples, and the run goes on alike."""
    schedule = [list(t) for t in NS_PRESETS["polar_express"][:5]]
    kw = dict(lr_scale="muon", ns_coefficients=schedule)
    _, _, opt = one_step(**kw)
    sd = copy.deepcopy(opt.state_dict())  # (loading keeps same-device tensors: no sharing here)
    sd["param_groups"][0]["ns_coefficients"] = schedule  # as JSON gives it back
    _, _, fresh = one_step()
    fresh.load_state_dict(sd)
    group = fresh.param_groups[0]
    assert group["lr_scale"] == "muon"
    assert group["ns_coefficients"] == tuple(tuple(t) for t in schedule)
    for a, b in zip(opt.param_groups[0]["params"], group["params"], strict=True):
        b.data.copy_(a.data)
        a.grad = b.grad = torch.ones_like(a)
    opt.step()
    fresh.step()
    for a, b in zip(opt.param_groups[0]["params"], group["params"], strict=True):
        assert torch.equal(a, b)
