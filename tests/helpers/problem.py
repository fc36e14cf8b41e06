"""A small optimization problem shared by the trajectory tests.

Parameters of every kind the spec distinguishes (square, tall and wide matrices, a 4-D tensor, an
embedding routed to AdamW, 1-D and 0-D tensors, one with gradients near eps) and a loss whose
gradient depends on the weights, so trajectories feed back as in training. Gradient scales are
chosen so that the c_t clip is always active for some matrices and never for others.
"""

from __future__ import annotations

import math

import torch

SHAPES = {
    "square": (8, 8),
    "tall": (16, 6),
    "wide": (5, 12),
    "conv": (4, 3, 3, 3),
    "embedding": (20, 8),
    "bias": (7,),
    "tiny_grad": (6,),
    "scalar": (),
}
# Which names take the matrix update (by group key or by ndim routing).
MATRIX = {"square", "tall", "wide", "conv"}
GRAD_SCALE = {
    "square": 1.0,     # ||c|| ~ 10: always clipped
    "tall": 0.01,      # ||c|| ~ 0.15: never clipped
    "wide": 0.3,
    "conv": 0.5,
    "embedding": 1.0,
    "bias": 1.0,
    "tiny_grad": 1e-8,  # AdamW with sqrt(v) ~ eps: the spec's eps placement matters here
    "scalar": 0.5,
}
BASE_LR = 0.02


def initial_params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return {n: (0.5 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype)
            for n, s in SHAPES.items()}


def batch(t: int, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(10_000 + t)
    out = {}
    for n, s in SHAPES.items():
        x = torch.randn(s, generator=gen, dtype=torch.float64)
        y = torch.randn(s, generator=gen, dtype=torch.float64)
        out[n] = (x.to(dtype), y.to(dtype))
    return out


def loss(params: dict[str, torch.Tensor], t: int) -> torch.Tensor:
    """sum_n scale_n * (sum tanh(W x) + 0.5 ||W - y||^2) on batch t."""
    dtype = next(iter(params.values())).dtype
    data = batch(t, dtype)
    total = torch.zeros((), dtype=dtype)
    for n, W in params.items():
        x, y = data[n]
        total = total + GRAD_SCALE[n] * (torch.tanh(W * x).sum() + 0.5 * ((W - y) ** 2).sum())
    return total


def grads(params: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    leaves = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    g = torch.autograd.grad(loss(leaves, t), list(leaves.values()))
    return dict(zip(leaves, g, strict=True))


def schedule(t: int) -> float:
    """Linear warm-up for 5 steps, then cosine decay to 0.1 over the next 15."""
    if t < 5:
        return (t + 1) / 5
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t - 5, 15) / 15))


def groups(params: dict[str, torch.Tensor]) -> list[dict]:
    """Three groups: forced MARS-M, forced AdamW, and one routed by ndim."""
    return [
        {"params": [(n, params[n]) for n in ("square", "tall")], "use_marsm": True},
        {"params": [("embedding", params["embedding"])], "use_marsm": False},
        {"params": [(n, params[n]) for n in ("wide", "conv", "bias", "tiny_grad", "scalar")]},
    ]


def leaf_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh trainable copies of the initial parameters."""
    return {n: p.clone().requires_grad_() for n, p in initial_params(dtype).items()}


def train(params, opt, start: int, stop: int, *, approx: bool, set_to_none: bool = True,
          sched=None) -> None:
    """Steps ``start .. stop-1`` of the standard loop (exact mode: look-ahead on batch t + 1)."""
    for t in range(start, stop):
        if not approx:
            loss(params, t + 1).backward()
            opt.store_lookahead_grad()
            opt.zero_grad(set_to_none=set_to_none)
        loss(params, t).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        if sched is not None:
            sched.step()
