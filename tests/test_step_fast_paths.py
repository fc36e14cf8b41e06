"""The step's fast paths give what the plain expressions give (marsm_dist/functional.py, _step.py)."""

from __future__ import annotations

import pytest
import torch

from marsm_dist import MARSM, NonFiniteGradError
from marsm_dist import functional as F


def test_variance_reduced_grads_is_the_spec_expression():
    gen = torch.Generator().manual_seed(0)
    g, p = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    kappa = F.marsm_kappa(0.95, 0.025)
    (c,) = F.variance_reduced_grads([g], [p], kappa=kappa)
    want = (g.double() + kappa * (g.double() - p.double())).float()
    assert torch.allclose(c, want, atol=1e-6, rtol=0)
    (first,) = F.variance_reduced_grads([g], [torch.zeros(1000)], kappa=kappa)  # P = 0 at step 1
    assert torch.allclose(first, (1 + kappa) * g, atol=1e-6, rtol=0)


def test_update_momentum_skips_only_factors_of_one():
    gen = torch.Generator().manual_seed(1)
    cs = [torch.randn(50, generator=gen) for _ in range(3)]
    ms = [torch.randn(50, generator=gen) for _ in range(3)]
    factors = [1.0, 0.25, 1.0]
    want = [m.lerp(c * f, 0.05) for m, c, f in zip(ms, cs, factors, strict=True)]
    F.update_momentum_(ms, [c.clone() for c in cs], factors, momentum=0.95)
    for m, w in zip(ms, want, strict=True):
        assert torch.equal(m, w)


@pytest.mark.parametrize("value", [1e25, float("nan"), float("-inf")])
def test_nonfinite_screen_of_adamw_grads(value):
    """A 2-norm overflow of a finite gradient is not mistaken for NaN/Inf; real ones still raise."""
    w, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(8))
    opt = MARSM([w, b], ns_dtype=torch.float32)
    w.grad, b.grad = torch.ones(4, 4), torch.ones(8)
    b.grad[3] = value
    if value == 1e25:  # its square overflows float32, but every entry is finite: a normal step
        opt.step()
        assert torch.isfinite(b).all() and not torch.equal(b.detach(), torch.ones(8))
    else:
        with pytest.raises(NonFiniteGradError, match="gradient"):
            opt.step()
        assert torch.equal(b.detach(), torch.ones(8)) and torch.equal(w.detach(), torch.ones(4, 4))


def test_float32_norm_overflow_of_a_finite_matrix_gradient_is_a_normal_step():
    """||c||^2 of a 1e20-scaled gradient overflows float32: the one host read shows Inf, the
    statistics are redone in float64, and the clipped step equals that of a unit-scale gradient."""
    results = []
    for scale in (1.0, 1e20):
        w = torch.nn.Parameter(torch.ones(4, 6))
        opt = MARSM([w], ns_dtype=torch.float32)
        w.grad = scale * torch.linspace(-1, 1, 24).reshape(4, 6)
        opt.step()
        results.append(w.detach().clone())
        assert opt.last_step_stats.clipped == 1
    assert torch.allclose(results[0], results[1], atol=1e-6, rtol=0)


def _run(case: str, monkeypatch, scratch: bool) -> list[torch.Tensor]:
    """Four steps of a mixed model; ``scratch=False`` takes the fresh-tensor path everywhere."""
    if not scratch:
        monkeypatch.setattr(F.Scratch, "views", lambda self, like, dtype=None, after=False: None)
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(96, 64), (64, 160), (200, 48), (32, 32), (10,)]]
    kw = {"chunked": {"bucket_bytes": 4 * 7000}, "maximize": {"maximize": True},
          "tensor": {"momentum": torch.tensor(0.9), "lr": torch.tensor(0.01)}, "kept": {},
          "bf16": {"ns_dtype": torch.bfloat16}}[case]
    kw.setdefault("ns_dtype", torch.float32)
    opt = MARSM([{"params": ps[:4], "use_marsm": True}, {"params": ps[4:], "use_marsm": False}], **kw)
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in ps] + [t.clone() for s in opt.state.values() for t in s.values()
                                               if torch.is_tensor(t)]


@pytest.mark.parametrize("case", ["kept", "chunked", "maximize", "tensor", "bf16"])
def test_the_kept_scratch_memory_changes_no_bit(case, monkeypatch):
    """c_t computed into kept memory (and O converted there) is the fresh-tensor path bit for bit:
    c_t kept for the momentum (one chunk), recomputed per chunk, negated grads, tensor kappa."""
    with_scratch = _run(case, monkeypatch, True)
    without = _run(case, monkeypatch, False)
    assert all(torch.equal(a, b) for a, b in zip(with_scratch, without, strict=True))


def test_scratch_views_reuse_one_buffer_and_keep_earlier_views_on_growth():
    scratch = F.Scratch()
    a = torch.ones(4, 3)
    (v,) = scratch.views([a])
    (w,) = scratch.views([torch.ones(2, 2)])
    assert v.data_ptr() == w.data_ptr()  # the same memory, reused
    v.fill_(1.0)
    (x,) = scratch.views([torch.ones(100)], after=True)  # grows: v keeps its old buffer
    x.fill_(2.0)
    assert v.shape == (4, 3) and bool((v == 1.0).all())
    assert scratch.views([torch.ones(2, device="meta")]) is None  # off the CPU: the caller allocates
    # Views of two dtypes in one set, step after step: the buffers stay the size of one set.
    for _ in range(3):
        scratch.views([torch.ones(10)])
        scratch.views([torch.ones(10, dtype=torch.bfloat16)], after=True)
        scratch.views([torch.ones(10)], after=True)
    assert scratch.nbytes() <= 4 * 104 + 2 * 10


def _adamw_run(fused: bool, *, maximize: bool = False) -> tuple[list, list]:
    torch.manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(3000, 16)),
          torch.nn.Parameter(torch.randn(16))]
    opt = MARSM([{"params": ps[:1], "use_marsm": True}, {"params": ps[1:], "use_marsm": False}], fused=fused,
                ns_dtype=torch.float32, maximize=maximize, weight_decay=0.1, lr=1e-2)
    for _ in range(5):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    states = [t.clone() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return [p.detach().clone() for p in ps], states


@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adamw_keeps_the_moments_bit_for_bit_and_the_weights_within_rounding(maximize):
    plain, plain_state = _adamw_run(False, maximize=maximize)
    fused, fused_state = _adamw_run(True, maximize=maximize)
    assert all(torch.equal(a, b) for a, b in zip(plain_state, fused_state, strict=True))  # m, v, M, P
    assert torch.equal(plain[0], fused[0])  # the matrix branch is untouched
    for a, b in zip(plain[1:], fused[1:], strict=True):
        assert (a - b).abs().max().item() <= 2 * torch.finfo(torch.float32).eps * a.abs().max().item()


def test_fused_adamw_is_the_spec_formula():
    """Against section 5 of the spec in float64 (eps on the uncorrected sqrt(v)), steps 1 to 3."""
    torch.manual_seed(8)
    w, g = torch.randn(500), [torch.randn(500) * 1e-3 for _ in range(3)]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.95, 1e-8, 0.1
    got, m, v = w.clone(), torch.zeros(500), torch.zeros(500)
    ref, mr, vr = w.double(), torch.zeros(500, dtype=torch.float64), torch.zeros(500, dtype=torch.float64)
    for k in (1, 2, 3):
        F.fused_adamw_update_([got], [g[k - 1]], [m], [v], [k], lr=lr, betas=(b1, b2), eps=eps,
                              weight_decay=wd)
        gd = g[k - 1].double()
        mr, vr = b1 * mr + (1 - b1) * gd, b2 * vr + (1 - b2) * gd * gd
        u = mr / (eps + vr.sqrt())
        ref = ref * (1 - lr * wd) - lr * u * (1 - b2**k) ** 0.5 / (1 - b1**k)
    assert (got.double() - ref).abs().max().item() < 1e-6


def test_fused_falls_back_where_the_kernel_does_not_take_the_tensors():
    f32, bf16 = torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)
    assert F.fused_adamw_serves([f32, f32]) and F.fused_adamw_serves([bf16, bf16])
    assert not F.fused_adamw_serves([f32, bf16])  # one dtype per call
    assert not F.fused_adamw_serves([torch.zeros(3, device="meta")] * 2)  # no kernel there
    assert not F.fused_adamw_serves([])
