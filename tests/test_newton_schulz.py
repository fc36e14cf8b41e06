"""Newton-Schulz against an SVD and against a float64 re-computation of the same iteration, and
the Gram form of the iteration against the plain one."""

from __future__ import annotations

import importlib

import pytest
import torch

from marsm_dist import MARSM
from marsm_dist.newton_schulz import NS_COEFFICIENTS, newton_schulz, newton_schulz_flops, resolve_form
from marsm_dist.orthogonalize import NSConfig, orthogonalize

SHAPES = [(32, 32), (48, 16), (16, 48), (1, 7), (7, 1)]


def float64_iteration(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The spec's iteration written out in float64, one matrix, explicit transposes."""
    a, b, c = NS_COEFFICIENTS
    X = G.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (torch.linalg.norm(X) + 1e-7)
    for _ in range(steps):
        S = X @ X.T
        X = a * X + (b * S + c * S @ S) @ X
    return X.T if tall else X


def with_singular_values(shape, sv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    return U[:, :k] @ torch.diag(sv) @ V[:, :k].T


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_float64_recomputation(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = newton_schulz(G, dtype=torch.float32)
    ref = float64_iteration(G)
    assert got.dtype == torch.float32 and got.shape == G.shape
    assert (got.double() - ref).abs().max() < 2e-5


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_bf16_is_within_bf16_noise_of_float64(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = newton_schulz(G)  # bf16 by default
    ref = float64_iteration(G)
    assert got.dtype == torch.bfloat16
    rel = torch.linalg.norm(got.double() - ref) / torch.linalg.norm(ref)
    assert rel < 0.05


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_singular_vectors_and_lands_in_band(shape, dtype):
    """O = U diag(f(s)) V^T: U^T O V is diagonal and f(s) lies in the quintic's band.

    Singular values span a 10x range; after normalization by the Frobenius norm the smallest is
    about 0.02, which 5 steps lift into [0.68, 1.2] (the iteration overshoots 1 by design).
    """
    k = min(shape)
    sv = torch.logspace(0, -1, k, dtype=torch.float64)
    G = with_singular_values(shape, sv, seed=3)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = newton_schulz(G.float(), dtype=dtype).double()
    D = U.T @ O @ Vh.T
    diag = torch.diagonal(D)
    off = D - torch.diag(diag)
    tol_off = 1e-4 if dtype == torch.float32 else 0.05
    assert off.abs().max() < tol_off
    assert diag.min() > 0.68 and diag.max() < 1.2, diag
    # ... and the output's own singular values agree with that diagonal.
    out_sv = torch.linalg.svdvals(O)
    assert torch.allclose(out_sv.sort().values, diag.sort().values, atol=tol_off * 4)


def test_tiny_singular_values_stay_small_not_amplified_to_one():
    sv = torch.tensor([1.0, 0.5, 1e-6], dtype=torch.float64)
    G = with_singular_values((3, 3), sv, seed=4)
    out = torch.linalg.svdvals(newton_schulz(G.float(), dtype=torch.float32).double())
    assert out.min() < 1e-3 and out.max() > 0.68


def test_batch_equals_one_at_a_time():
    G = torch.randn(4, 12, 20, generator=torch.Generator().manual_seed(5))
    batched = newton_schulz(G, dtype=torch.float32)
    single = torch.stack([newton_schulz(g, dtype=torch.float32) for g in G])
    assert torch.allclose(batched, single, atol=1e-6, rtol=0)


def test_tensor_norm_mode_normalizes_the_whole_tensor():
    G = torch.randn(4, 3, 3, 5, generator=torch.Generator().manual_seed(6))
    got = newton_schulz(G, dtype=torch.float32, norm_over="tensor")
    # Spec semantics: batch over the trailing matrices, one Frobenius norm for the whole tensor.
    a, b, c = NS_COEFFICIENTS
    X = G.double() / (G.double().norm() + 1e-7)
    for _ in range(5):
        S = X @ X.transpose(-2, -1)
        X = a * X + (b * S + c * S @ S) @ X
    assert (got.double() - X).abs().max() < 2e-5
    per_matrix = newton_schulz(G, dtype=torch.float32, norm_over="matrix")
    assert (per_matrix - got).abs().max() > 1e-2


def test_scale_invariance():
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(7))
    a = newton_schulz(G, dtype=torch.float32)
    b = newton_schulz(1000.0 * G, dtype=torch.float32)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stack", [True, False])
def test_orthogonalize_batches_by_shape_and_keeps_order(stack):
    gen = torch.Generator().manual_seed(8)
    tensors = [torch.randn(s, generator=gen) for s in [(8, 8), (4, 6), (8, 8), (2, 3, 3, 3), (8, 8)]]
    fp32 = NSConfig(5, torch.float32, NS_COEFFICIENTS)
    cfgs = [fp32, fp32, NSConfig(3, torch.float32, NS_COEFFICIENTS), fp32, fp32]
    out = orthogonalize(tensors, cfgs, stack=stack)
    for t, cfg, o in zip(tensors, cfgs, out, strict=True):
        mode = "tensor" if t.ndim > 2 else "matrix"
        ref = newton_schulz(t, cfg.steps, dtype=torch.float32, norm_over=mode)
        assert o.shape == t.shape and torch.allclose(o, ref, atol=1e-6, rtol=0)
    flat = orthogonalize([tensors[3]], [NSConfig(5, torch.float32, NS_COEFFICIENTS, True)], stack=stack)[0]
    assert torch.allclose(flat, newton_schulz(tensors[3].reshape(2, 27), dtype=torch.float32)
                          .reshape(2, 3, 3, 3), atol=1e-6, rtol=0)


def test_rejects_vectors_and_counts_flops_by_hand():
    with pytest.raises(ValueError, match="at least 2 dims"):
        newton_schulz(torch.randn(5))
    # (4, 6): n=4, m=6 per step: XX^T 4*4*6, S S 4^3, P X 4*4*6 multiply-adds, 2 FLOPs each.
    assert newton_schulz_flops((4, 6), steps=5) == 5 * 2 * (96 + 64 + 96)
    assert newton_schulz_flops((3, 6, 4), steps=1) == 3 * 2 * (96 + 64 + 96)


# ----------------------------------------------------------------------------- Gram form
# (m, n) pairs: wide, tall (handled by the transpose), square, and aspect ratios 2..8.
GRAM_SHAPES = [(16, 32), (32, 16), (24, 24), (12, 48), (48, 12), (8, 64), (130, 300)]


def spectrum_matrix(shape, kind, seed=11):
    """Well-conditioned (Gaussian), decaying spectrum (1 .. 1e-4) or rank-deficient inputs."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    k = min(shape)
    if kind == "decaying":
        return with_singular_values(shape, torch.logspace(0, -4, k, dtype=torch.float64), seed)
    sv = torch.zeros(k, dtype=torch.float64)
    sv[: max(1, k // 8)] = 1.0  # rank k/8
    return with_singular_values(shape, sv, seed)


@pytest.mark.parametrize("shape", GRAM_SHAPES)
@pytest.mark.parametrize("kind", ["gauss", "decaying", "lowrank"])
def test_gram_form_is_the_same_iteration_in_float64(shape, kind):
    G = spectrum_matrix(shape, kind)
    plain = newton_schulz(G, dtype=torch.float64, form="plain")
    gram = newton_schulz(G, dtype=torch.float64, form="gram")
    assert gram.shape == G.shape and gram.dtype == torch.float64
    assert (gram - plain).abs().max() < 1e-10
    assert (plain - float64_iteration(G)).abs().max() < 1e-12


@pytest.mark.parametrize("shape", GRAM_SHAPES)
@pytest.mark.parametrize("kind", ["gauss", "decaying", "lowrank"])
@pytest.mark.parametrize("steps", [1, 3, 5, 7])
def test_gram_form_float32_is_as_accurate_as_plain(shape, kind, steps):
    """Against the float64 iteration, float32 Gram stays within a small factor of float32 plain."""
    G = spectrum_matrix(shape, kind)
    ref = float64_iteration(G, steps)
    err = {form: (newton_schulz(G.float(), steps, dtype=torch.float32, form=form).double() - ref)
           .norm() / ref.norm() for form in ("plain", "gram")}
    assert err["gram"] < max(4 * err["plain"], 1e-5), err


def test_gram_form_batched_and_tensor_norm():
    gen = torch.Generator().manual_seed(12)
    G = torch.randn(3, 20, 70, generator=gen, dtype=torch.float64)
    for mode in ("matrix", "tensor"):
        plain = newton_schulz(G, dtype=torch.float64, norm_over=mode, form="plain")
        gram = newton_schulz(G, dtype=torch.float64, norm_over=mode, form="gram")
        assert (gram - plain).abs().max() < 1e-10
    one_by_one = torch.stack([newton_schulz(g, dtype=torch.float32, form="gram") for g in G.float()])
    assert torch.allclose(newton_schulz(G.float(), dtype=torch.float32, form="gram"), one_by_one,
                          atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (16, 128)])
def test_gram_form_keeps_singular_vectors_svd_check(shape):
    k = min(shape)
    G = with_singular_values(shape, torch.logspace(0, -1, k, dtype=torch.float64), seed=13)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    O = newton_schulz(G.float(), dtype=torch.float32, form="gram").double()
    D = U.T @ O @ Vh.T
    diag = torch.diagonal(D)
    assert (D - torch.diag(diag)).abs().max() < 1e-4
    assert diag.min() > 0.68 and diag.max() < 1.2, diag


def test_auto_form_choice():
    f32, bf16 = torch.float32, torch.bfloat16
    assert resolve_form("auto", (768, 3072), 5, f32) == "gram"
    assert resolve_form("auto", (3072, 768), 5, f32) == "gram"  # tall: the transposed orientation
    assert resolve_form("auto", (2304, 768), 5, torch.float64) == "gram"
    assert resolve_form("auto", (768, 768), 5, f32) == "plain"  # square: Gram costs more
    assert resolve_form("auto", (768, 1024), 5, f32) == "plain"  # aspect 1.33: not worth it
    assert resolve_form("auto", (64, 1024), 5, f32) == "plain"  # small: launch-bound
    # bfloat16 never takes the Gram form on "auto": measured less accurate (see newton_schulz.py).
    assert resolve_form("auto", (768, 3072), 5, bf16) == "plain"
    assert resolve_form("gram", (8, 8), 5, bf16) == "gram"
    assert resolve_form("plain", (768, 3072), 5, f32) == "plain"
    with pytest.raises(ValueError, match="Newton-Schulz form"):
        resolve_form("fast", (4, 4), 5, f32)
    with pytest.raises(ValueError, match="Newton-Schulz form"):
        newton_schulz(torch.randn(4, 4), form="fast")
    # auto in bf16 is exactly the plain form.
    G = torch.randn(128, 512, generator=torch.Generator().manual_seed(14))
    assert torch.equal(newton_schulz(G), newton_schulz(G, form="plain"))
    assert torch.equal(newton_schulz(G, dtype=f32, form="auto"), newton_schulz(G, dtype=f32, form="gram"))


def test_gram_flops_by_hand():
    # (4, 16), 5 steps = segments of 3 and 2 steps. Each: X X^T and Q X (4*4*16 each) plus
    # (4L - 3) products of 4x4 matrices; 2 FLOPs per multiply-add.
    m, n = 4, 16
    want = 2 * ((2 * m * m * n + 9 * m**3) + (2 * m * m * n + 5 * m**3))
    assert newton_schulz_flops((m, n), 5, form="gram") == want
    assert newton_schulz_flops((2, n, m), 5, form="gram") == 2 * want
    assert newton_schulz_flops((m, n), 5) == newton_schulz_flops((m, n), 5, form="plain")
    plain, gram = (newton_schulz_flops((768, 3072), 5, form=f) for f in ("plain", "gram"))
    assert gram < 0.7 * plain


@pytest.mark.parametrize("stack", [True, False, None], ids=["stacked", "one-by-one", "by-device"])
def test_orthogonalize_batches_tall_with_wide(stack):
    """A (n, m) and an (m, n) matrix share one batch (transposed); results match one at a time."""
    gen = torch.Generator().manual_seed(15)
    tensors = [torch.randn(s, generator=gen) for s in [(12, 30), (30, 12), (12, 30), (30, 12, 1, 1)]]
    fp32 = NSConfig(5, torch.float32, NS_COEFFICIENTS)
    cfgs = [fp32, fp32, NSConfig(5, torch.float32, NS_COEFFICIENTS, form="gram"),
            NSConfig(5, torch.float32, NS_COEFFICIENTS, True)]
    out = orthogonalize(tensors, cfgs, stack=stack)
    for t, o in zip(tensors, out, strict=True):
        ref = newton_schulz(t.reshape(t.shape[0], -1), dtype=torch.float32, form="plain").reshape(t.shape)
        assert o.shape == t.shape and torch.allclose(o, ref, atol=1e-6, rtol=0)
    for dtype in (torch.float32, torch.bfloat16):  # a tall matrix alone: exactly NS of it
        cfg = NSConfig(5, dtype, NS_COEFFICIENTS)
        got = orthogonalize([tensors[1]], [cfg], stack=stack)[0]
        assert torch.equal(got, newton_schulz(tensors[1], dtype=dtype))


def test_cpu_bfloat16_emulation_matches_torch_kernels(monkeypatch):
    """bf16 NS on a CPU without bf16 matmul runs float32 products rounded to bf16 (newton_schulz.py).

    It must stay bf16 arithmetic: one product agrees with torch's bf16 kernel up to rare one-ulp
    differences, and the whole iteration is within bf16 noise of it and as far from float64.
    """
    ns_module = importlib.import_module("marsm_dist.newton_schulz")
    G = spectrum_matrix((48, 96), "gauss").float()
    one_step = {}
    full = {}
    for emulate in (True, False):
        monkeypatch.setattr(ns_module, "EMULATE_CPU_BF16", emulate)
        one_step[emulate] = newton_schulz(G, 1)
        full[emulate] = newton_schulz(G).double()
        assert full[emulate].dtype == torch.float64 and one_step[emulate].dtype == torch.bfloat16
    assert (one_step[True] != one_step[False]).float().mean() < 0.01
    ref = float64_iteration(G.double())
    errs = [(full[e] - ref).norm() / ref.norm() for e in (True, False)]
    assert (full[True] - full[False]).norm() / ref.norm() < 0.03
    assert abs(errs[0] - errs[1]) < 0.2 * errs[1], errs


def test_ns_form_group_key_in_the_optimizer():
    """MARSM's ns_form (a constructor argument and group key): the forms agree and a bad one is
    refused when the group is added."""
    results = {}
    for form in ("plain", "gram", None):
        p = torch.nn.Parameter(torch.randn(32, 96, generator=torch.Generator().manual_seed(16)))
        p.grad = torch.randn(32, 96, generator=torch.Generator().manual_seed(17))
        group = {"params": [p]} if form is None else {"params": [p], "ns_form": form}
        MARSM([group], lr=0.1, ns_dtype=torch.float32).step()
        results[form] = p.detach().clone()
    assert torch.allclose(results["plain"], results["gram"], atol=1e-6, rtol=0)
    assert torch.equal(results[None], results["plain"])  # "auto" keeps small matrices plain
    p = torch.nn.Parameter(torch.ones(8, 8))
    with pytest.raises(ValueError, match="ns_form.*fast"):
        MARSM([{"params": [p], "ns_form": "fast"}])
    with pytest.raises(ValueError, match="ns_form.*fast"):
        MARSM([p], ns_form="fast")


@pytest.mark.parametrize("shape", [(256, 300), (300, 256), (511, 640)])
def test_blocked_symmetric_product_is_the_full_product(shape, monkeypatch):
    """X X^T from row blocks (CPU, >= 256 rows) is X X^T: exactly symmetric, and Newton-Schulz
    with it agrees with the full products (bit for bit on the CPUs measured; within rounding)."""
    from marsm_dist import ns_products

    torch.manual_seed(0)
    G = torch.randn(*shape)
    x = G[: min(shape)] if shape[0] > shape[1] else G
    S = ns_products.gram_product(x)
    assert torch.equal(S, S.mT)
    assert torch.allclose(S, x @ x.mT, rtol=1e-5, atol=1e-4)
    blocked = {dt: newton_schulz(G, 5, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(ns_products, "SYMMETRIC_MIN_ROWS", 1 << 62)  # every X X^T in one product
    assert (blocked[torch.float32] - newton_schulz(G, 5, dtype=torch.float32)).abs().max() < 1e-5
    full = newton_schulz(G, 5, dtype=torch.bfloat16).float()
    assert (blocked[torch.bfloat16].float() - full).abs().max() <= 2 * 2**-8 * full.abs().max()
