"""An independent, deliberately plain re-implementation of the MARS-M spec, used as a test oracle.

It shares no code with marsm_dist: one tensor at a time, no foreach, no batching, written from
docs/algorithm.md sections 3-6 and 9. It runs in any dtype (float64 by default).
"""

from __future__ import annotations

import math

import torch

A, B, C = 3.4445, -4.7750, 2.0315


def reference_ns(M: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Spec section 4; a >2-D tensor is a batch over its last two dims, normalized as a whole."""
    X = M.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.transpose(-2, -1)
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        S = X @ X.transpose(-2, -1)
        X = A * X + (B * S + C * (S @ S)) @ X
    if tall:
        X = X.transpose(-2, -1)
    return X


class ReferenceMARSM:
    """MARS-M over a dict of named tensors. ``matrix`` names take the matrix update."""

    def __init__(self, params, matrix, *, weight_decay=0.1, momentum=0.95, gamma=0.025,
                 ns_steps=5, betas=(0.9, 0.95), eps=1e-8, approx=True, flatten=False,
                 ns_dtype=torch.float64):
        self.params = params
        self.matrix = set(matrix)
        self.wd, self.beta, self.gamma = weight_decay, momentum, gamma
        self.ns_steps, self.betas, self.eps = ns_steps, betas, eps
        self.approx, self.flatten, self.ns_dtype = approx, flatten, ns_dtype
        self.state = {name: {} for name in params}

    def step(self, grads, lr, lookahead=None):
        """One step. ``lookahead`` (exact mode) is the gradient at the current weights on the
        next batch; it becomes P for the next step."""
        for name, W in self.params.items():
            g = grads[name]
            if name in self.matrix:
                self._matrix(name, W, g, lr, None if lookahead is None else lookahead[name])
            else:
                self._adamw(name, W, g, lr)

    def _matrix(self, name, W, g, lr, lookahead):
        st = self.state[name]
        P = st.get("P", torch.zeros_like(W))
        M = st.get("M", torch.zeros_like(W))
        kappa = self.gamma * self.beta / (1 - self.beta)
        c = g + kappa * (g - P)
        n = torch.sqrt((c * c).sum())
        if n > 1:
            c = c / n
        M = self.beta * M + (1 - self.beta) * c
        st["M"] = M
        if W.ndim > 2 and self.flatten:
            O = reference_ns(M.reshape(W.shape[0], -1), self.ns_steps, self.ns_dtype)
            rows, cols = W.shape[0], W[0].numel()
        else:
            O = reference_ns(M, self.ns_steps, self.ns_dtype)
            rows, cols = W.shape[0], W.shape[1]
        s = 0.2 * math.sqrt(max(rows, cols))
        W.mul_(1 - lr * self.wd)
        W.sub_(lr * s * O.reshape(W.shape).to(W.dtype))
        if self.approx:
            st["P"] = g.clone()
        else:
            if lookahead is None:
                raise ValueError("exact mode needs the look-ahead gradient")
            st["P"] = lookahead.clone()

    def _adamw(self, name, W, g, lr):
        st = self.state[name]
        b1, b2 = self.betas
        k = st.get("k", 0) + 1
        m = b1 * st.get("m", torch.zeros_like(W)) + (1 - b1) * g
        v = b2 * st.get("v", torch.zeros_like(W)) + (1 - b2) * g * g
        st.update(k=k, m=m, v=v)
        u = m / (self.eps + torch.sqrt(v))
        W.mul_(1 - lr * self.wd)
        W.sub_(lr * u * math.sqrt(1 - b2**k) / (1 - b1**k))
