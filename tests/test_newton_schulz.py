"""Newton-Schulz against an SVD and against a float64 re-computation of the same iteration."""

from __future__ import annotations

import pytest
import torch

from marsm_dist.newton_schulz import NS_COEFFICIENTS, newton_schulz, newton_schulz_flops
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


def test_orthogonalize_batches_by_shape_and_keeps_order():
    gen = torch.Generator().manual_seed(8)
    tensors = [torch.randn(s, generator=gen) for s in [(8, 8), (4, 6), (8, 8), (2, 3, 3, 3), (8, 8)]]
    fp32 = NSConfig(5, torch.float32, NS_COEFFICIENTS)
    cfgs = [fp32, fp32, NSConfig(3, torch.float32, NS_COEFFICIENTS), fp32, fp32]
    out = orthogonalize(tensors, cfgs)
    for t, cfg, o in zip(tensors, cfgs, out, strict=True):
        mode = "tensor" if t.ndim > 2 else "matrix"
        ref = newton_schulz(t, cfg.steps, dtype=torch.float32, norm_over=mode)
        assert o.shape == t.shape and torch.allclose(o, ref, atol=1e-6, rtol=0)
    flat = orthogonalize([tensors[3]], [NSConfig(5, torch.float32, NS_COEFFICIENTS, True)])[0]
    assert torch.allclose(flat, newton_schulz(tensors[3].reshape(2, 27), dtype=torch.float32)
                          .reshape(2, 3, 3, 3), atol=1e-6, rtol=0)


def test_rejects_vectors_and_counts_flops_by_hand():
    with pytest.raises(ValueError, match="at least 2 dims"):
        newton_schulz(torch.randn(5))
    # (4, 6): n=4, m=6 per step: XX^T 4*4*6, S S 4^3, P X 4*4*6 multiply-adds, 2 FLOPs each.
    assert newton_schulz_flops((4, 6), steps=5) == 5 * 2 * (96 + 64 + 96)
    assert newton_schulz_flops((3, 6, 4), steps=1) == 3 * 2 * (96 + 64 + 96)
