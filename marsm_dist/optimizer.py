"""``MARSM``: the MARS-M optimizer as a ``torch.optim.Optimizer`` (spec: marsm-algorithm.md)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from . import functional as F
from ._step_inputs import (
    GroupWork,
    check_grad,
    check_lookahead_ready,
    collect,
    describe_overflow,
    first_nonfinite,
    nonfinite_flag,
    param_name,
)
from ._validation import check_param, resolve_dtype, validate_hyperparameters
from .newton_schulz import NS_COEFFICIENTS
from .orthogonalize import NSConfig, orthogonalize, scale_for

__all__ = ["MARSM", "NonFiniteGradError"]

logger = logging.getLogger(__name__)

# Keys a param group may carry, with the values a group added by an older version should get.
_GROUP_DEFAULTS = dict(ns_coefficients=NS_COEFFICIENTS, flatten=False, maximize=False, use_marsm=None)


class NonFiniteGradError(RuntimeError):
    """A gradient holds NaN or Inf; the step was refused and nothing was changed."""


class MARSM(Optimizer):
    """MARS-M: variance-reduced momentum with Newton-Schulz orthogonalized updates for matrices.

    Matrix parameters (``use_marsm=True`` groups, or ``ndim >= 2`` in groups without the key)::

        c = g + kappa (g - P),  kappa = gamma momentum / (1 - momentum)
        c = c / ||c||_F  if ||c||_F > 1
        M = momentum M + (1 - momentum) c
        W = W (1 - lr weight_decay) - lr 0.2 sqrt(max(A, B)) NS(M)

    P is the previous step's gradient (``approx=True``) or the look-ahead gradient stored with
    :meth:`store_lookahead_grad` before the previous step (``approx=False``); P = 0 at step 1.
    Everything else (``use_marsm=False`` groups, 0-D/1-D tensors) takes the AdamW branch, whose eps
    is added to the uncorrected sqrt(v). Use :func:`marsm_dist.param_groups` to send embeddings and
    the output head to the AdamW branch, as the paper's recipes do.

    Args:
        params: parameters, named parameters, or param groups. A group may override any
            hyperparameter below and carry ``"use_marsm"``.
        lr: learning rate, shared by both branches (default 1e-3).
        weight_decay: decoupled weight decay, multiplied by the unscaled lr (default 0.1).
        momentum: EMA factor of the matrix momentum, in [0, 1) (default 0.95).
        gamma: variance-reduction strength (default 0.025).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: Newton-Schulz compute dtype (default ``torch.bfloat16``; a name such as
            ``"float32"`` is accepted).
        adamw_betas: (beta1, beta2) of the AdamW branch (default (0.9, 0.95)).
        adamw_eps: eps of the AdamW branch (default 1e-8).
        approx: True for the approximate correction (P = last gradient, one backward per
            step); False for the exact one (call :meth:`store_lookahead_grad` before each step).
        ns_coefficients: the quintic's (a, b, c).
        flatten: orthogonalize tensors with more than 2 dims as ``(dim0, rest)`` matrices, with
            the scale taken from that shape (the common Muon convention). The default follows the
            spec: a batch of trailing 2-D matrices normalized by the whole-tensor norm, scale from
            the first two dims.
        maximize: maximize the objective instead of minimizing it.
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFiniteGradError` naming the
            parameter when a gradient holds NaN/Inf; ``"skip"`` skips the whole step instead.
            Either way parameters and state are left untouched.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        gamma: float = 0.025,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | str = torch.bfloat16,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        approx: bool = True,
        *,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        flatten: bool = False,
        maximize: bool = False,
        on_nonfinite: str = "raise",
    ) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, gamma=gamma,
                        ns_steps=ns_steps, ns_dtype=ns_dtype, adamw_betas=tuple(adamw_betas),
                        adamw_eps=adamw_eps, approx=approx, ns_coefficients=tuple(ns_coefficients),
                        flatten=flatten, maximize=maximize, use_marsm=None)
        validate_hyperparameters(defaults)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid on_nonfinite: {on_nonfinite!r} (expected 'raise' or 'skip')")
        self.on_nonfinite = on_nonfinite
        self.skipped_steps = 0
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("on_nonfinite", "raise")
        self.__dict__.setdefault("skipped_steps", 0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer``); its hyperparameters are validated."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if isinstance(group["adamw_betas"], list):
                group["adamw_betas"] = tuple(group["adamw_betas"])
            validate_hyperparameters(group, f" in param group {len(self.param_groups) - 1}")
            group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
            for i, p in enumerate(group["params"]):
                check_param(p, group, param_name(self.param_groups, group, i))
        except ValueError:
            self.param_groups.pop()  # a refused group must not stay half-added
            raise

    # ----------------------------------------------------------------------------- routing, state
    @staticmethod
    def uses_marsm(group: dict[str, Any], p: Tensor) -> bool:
        """True if ``p`` takes the matrix update in ``group`` (the key, else ``ndim >= 2``)."""
        use = group["use_marsm"]
        return p.ndim >= 2 if use is None else use

    def _ensure_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """The parameter's state, with any missing key created (zeros); existing keys untouched."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if self.uses_marsm(group, p):
            keys = ("exp_avg", "last_grad") + (() if group["approx"] else ("lookahead_grad",))
            if not group["approx"]:
                state.setdefault("lookahead_ready", False)
        else:
            keys = ("exp_avg", "exp_avg_sq")
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every state tensor now (zeros), so all keys exist before the first step.

        Checkpoint helpers that need rank-symmetric keys call this instead of a dummy step.
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._ensure_state(group, p)

    @torch.no_grad()
    def store_lookahead_grad(self) -> None:
        """Exact mode: copy each matrix parameter's ``.grad`` as the look-ahead gradient.

        Call it after a backward pass at the *current* weights on the *next* step's batch, then
        zero the grads, compute this step's gradient and call :meth:`step`. That step still uses
        the previously stored look-ahead as P; afterwards this one becomes P. A matrix parameter
        without a gradient stores zeros.
        """
        groups = [g for g in self.param_groups if not g["approx"]]
        if not groups:
            raise RuntimeError("store_lookahead_grad() is for approx=False; every group has approx=True")
        for group in groups:
            for i, p in enumerate(group["params"]):
                if not self.uses_marsm(group, p):
                    continue
                state = self._ensure_state(group, p)
                buf = state["lookahead_grad"]
                if p.grad is None:
                    buf.zero_()
                else:
                    check_grad(self.param_groups, group, i, p.grad)
                    buf.copy_(p.grad)
                    if group["maximize"]:
                        buf.neg_()
                state["lookahead_ready"] = True

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Take one optimization step; ``closure`` (optional) re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrix, adamw = collect(self.param_groups, self.uses_marsm)
        check_lookahead_ready(self.param_groups, matrix, self.state)
        matrix = [w for w in matrix if w.params]
        # Phase 1 writes nothing: c_t of every matrix, then one vector with their squared norms
        # (the clip needs whole-tensor norms) and a NaN/Inf screen of everything else this step
        # consumes. A NaN/Inf in a matrix gradient shows up in its norm, so it costs no extra pass.
        grads, states, cs = self._precondition(matrix)
        screened = [t for w in adamw for t in w.grads] + [
            self.state[p]["lookahead_grad"] for w in matrix if not w.group["approx"] for p in w.params]
        stats = self._reduce_step_stats(
            torch.cat([F.squared_norms([c for group in cs for c in group]), nonfinite_flag(screened)]))
        if not bool(torch.isfinite(stats).all()):
            bad = first_nonfinite(self.param_groups, matrix, adamw, self.state) or describe_overflow(
                self.param_groups, matrix, stats)
            if self.on_nonfinite == "raise":
                raise NonFiniteGradError(
                    f"MARSM: the {bad} contains NaN or Inf; parameters and optimizer state were "
                    "left untouched. Pass on_nonfinite='skip' to skip such steps instead."
                )
            self._skip_step(matrix, bad)
            return loss
        for work in adamw:
            self._adamw_step(work)
        self._matrix_update(matrix, grads, states, cs, F.clip_factors(stats[:-1]))
        return loss

    def _skip_step(self, matrix: list[GroupWork], bad: str) -> None:
        self.skipped_steps += 1
        logger.warning("MARSM: skipped a step because the %s contains NaN or Inf", bad)
        for work in matrix:
            for p in work.params:
                if "lookahead_ready" in self.state[p]:
                    self.state[p]["lookahead_ready"] = False

    def _adamw_step(self, work: GroupWork) -> None:
        if not work.params:
            return
        g = work.group
        states = [self._ensure_state(g, p) for p in work.params]
        for s in states:
            s["step"] += 1
        grads = torch._foreach_neg(work.grads) if g["maximize"] else work.grads
        F.adamw_update_(
            work.params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [int(s["step"].item()) for s in states], lr=float(g["lr"]), betas=g["adamw_betas"],
            eps=float(g["adamw_eps"]), weight_decay=float(g["weight_decay"]),
        )

    def _precondition(self, works: list[GroupWork]):
        """Per group: the (sign-adjusted) gradients, the states and c_t = g + kappa (g - P)."""
        grads, states, cs = [], [], []
        for work in works:
            g = work.group
            st = [self._ensure_state(g, p) for p in work.params]
            gs = torch._foreach_neg(work.grads) if g["maximize"] else work.grads
            kappa = F.marsm_kappa(float(g["momentum"]), float(g["gamma"]))
            cs.append(F.variance_reduced_grads(gs, [s["last_grad"] for s in st], kappa=kappa))
            grads.append(gs)
            states.append(st)
        return grads, states, cs

    def _matrix_update(self, works, grads, states, cs, factors: list[float]) -> None:
        """Clip and accumulate momentum, orthogonalize, apply, then set P for the next step."""
        momenta, configs, start = [], [], 0
        for work, st, c in zip(works, states, cs, strict=True):
            g = work.group
            n = len(c)
            exp_avgs = [s["exp_avg"] for s in st]
            F.update_momentum_(exp_avgs, c, factors[start:start + n], momentum=float(g["momentum"]))
            start += n
            momenta += exp_avgs
            configs += [NSConfig(g["ns_steps"], g["ns_dtype"], g["ns_coefficients"], g["flatten"])] * n
        orthos = self._orthogonalize(momenta, configs)
        start = 0
        for work, st, gs in zip(works, states, grads, strict=True):
            g, n = work.group, len(st)
            F.apply_matrix_update_(
                work.params, orthos[start:start + n], lr=float(g["lr"]),
                weight_decay=float(g["weight_decay"]),
                scales=[scale_for(p.shape, g["flatten"]) for p in work.params],
            )
            start += n
            self._promote_previous_grads(g, st, gs)

    def _promote_previous_grads(self, group: dict[str, Any], states: list[dict], grads: list[Tensor]):
        """Set P for the next step: a copy of g (approx) or the stored look-ahead (exact)."""
        for s in states:
            s["step"] += 1
        if group["approx"]:
            # A copy, never an alias of .grad: zero_grad(set_to_none=False) zeroes .grad in place.
            torch._foreach_copy_([s["last_grad"] for s in states], grads)
            return
        for s in states:
            s["last_grad"], s["lookahead_grad"] = s["lookahead_grad"], s["last_grad"]
            s["lookahead_ready"] = False

    # Seams for the sharding engine: a single process is a world of one.
    def _reduce_step_stats(self, stats: Tensor) -> Tensor:
        """Sum the per-matrix squared norms (and the NaN screen) over the ranks holding shards."""
        return stats

    def _orthogonalize(self, tensors: list[Tensor], configs: list[NSConfig]) -> list[Tensor]:
        return orthogonalize(tensors, configs)
