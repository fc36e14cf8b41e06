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
