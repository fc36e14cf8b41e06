"""MARS-M's elementwise math as pure functions on lists of tensors (docs/algorithm.md sections 3 and 5).

Nothing here knows about processes or frameworks: every function works the same on whole
parameters and on the shards a rank holds. The one step that needs the whole tensor, the clip
norm, is split so that a caller can sum squared norms over shards before :func:`clip_factors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Scratch",
    "adamw_update_",
    "fused_adamw_serves",
    "fused_adamw_update_",
    "apply_matrix_update_",
    "chunks",
    "clip_factors",
    "marsm_kappa",
    "nonfinite_flag",
    "squared_norms",
    "takes_marsm",
    "update_momentum_",
    "update_scale",
    "variance_reduced_grads",
]


def takes_marsm(use_marsm: bool | None, shape: Sequence[int], stacked: bool = False) -> bool:
    """The routing rule, written once: a group's ``use_marsm`` when it is set, else the tensor's
    shape: 2+ dims per matrix take MARS-M (``stacked``: dim 0 indexes experts, so one dim more)."""
    if use_marsm is not None:
        return bool(use_marsm)
    return len(shape) - (1 if stacked else 0) >= 2


def chunks(numels: Sequence[int], limit: int) -> list[list[int]]:
    """Positions of consecutive tensors, at most ``limit`` elements a chunk (a larger one alone):
    the unit of a step's elementwise temporaries and of its unsharded Newton-Schulz batches."""
    out: list[list[int]] = []
    held = 0
    for i, n in enumerate(numels):
        if not out or (held and held + n > limit):
            out.append([])
            held = 0
        out[-1].append(i)
        held += n
    return out


def marsm_kappa(momentum: float, gamma: float) -> float:
    """The variance-reduction factor kappa = gamma * beta / (1 - beta) (0.475 with the defaults)."""
    return gamma * momentum / (1.0 - momentum)


def update_scale(shape: Sequence[int]) -> float:
    """The update scale s = 0.2 * sqrt(max(A, B)) from the first two dims of ``shape``."""
    return 0.2 * math.sqrt(max(shape[0], shape[1]))


class Scratch:
    """Memory for a step's large elementwise temporaries, kept between steps (CPU only).

    Why: on a CPU a fresh multi-megabyte tensor comes as fresh pages from the OS on every step
    (the C allocator hands large blocks back), and touching them costs more than the arithmetic:
    an out-of-place lerp of a (3072, 768) float32 gradient took 2.5 ms against 0.7 ms for the same
    lerp into memory already touched (1 thread, AVX-512 EPYC). On GPUs the caching allocator
    already reuses memory, so :meth:`views` gives None there and callers allocate as before.
    One flat buffer per dtype, grown to the largest request and never shrunk. A request is at most
    one chunk of temporaries, or the float32 copy of one matrix's O where a matrix is larger than a
    chunk: the larger of ``bucket_bytes`` and the largest matrix, the bound the step's extra
    memory already had (benchmarks/memory.py), now kept between steps.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}
        self._end: dict[torch.dtype, int] = {}

    def nbytes(self) -> int:
        """Bytes held now."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def views(self, like: Sequence[Tensor], dtype: torch.dtype | None = None, *, after: bool = False
              ) -> list[Tensor] | None:
        """Contiguous tensors shaped as ``like`` (in ``dtype``, else theirs), one after the other in
        the kept buffer, valid until a later call without ``after`` (with it: placed after the views
        given since, which stay valid). None off the CPU."""
        if not like or any(t.device.type != "cpu" for t in like):
            return None
        dtype = dtype or like[0].dtype
        if not after:  # a new set of views: every earlier one, of any dtype, may be overwritten
            self._end.clear()
        start = self._end.get(dtype, 0)
        end = start + sum(t.numel() for t in like)
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < end:  # (views already given keep the old buffer alive)
            buf = self._buffers[dtype] = torch.empty(end, dtype=dtype)
        self._end[dtype] = end
        out = []
        for t in like:
            out.append(buf[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return out


def variance_reduced_grads(
    grads: list[Tensor], prev_grads: list[Tensor], *, kappa: float | Tensor, out: list[Tensor] | None = None
) -> list[Tensor]:
    """Return c = g + kappa (g - P), one per gradient: new tensors, or ``out`` filled.

    One pass: lerp(P, g, w) with w = 1 + kappa >= 0.5 is evaluated as g - (g - P)(1 - w), i.e.
    g + kappa (g - P), as docs/algorithm.md section 3 writes it (two foreach ops took two passes). A tensor
    ``kappa`` (momentum or gamma held in device tensors) takes three passes and no host read.
    The same arithmetic either way, so ``out`` changes no bit of c.
    """
    if not grads:
        return []
    if out is not None:
        k = kappa.to(grads[0].dtype) if isinstance(kappa, Tensor) else None
        for p, g, o in zip(prev_grads, grads, out, strict=True):
            if k is not None:
                torch.sub(g, p, out=o).mul_(k).add_(g)
            else:
                torch.lerp(p, g, 1.0 + kappa, out=o)
        return out
    if isinstance(kappa, Tensor):
        cs = list(torch._foreach_sub(grads, prev_grads))
        torch._foreach_mul_(cs, kappa.to(grads[0].dtype))
        torch._foreach_add_(cs, grads)
        return cs
    return list(torch._foreach_lerp(prev_grads, grads, 1.0 + kappa))


def squared_norms(tensors: list[Tensor], *, precise: bool = False) -> Tensor:
    """The squared Frobenius norm of each tensor as one float64 vector (sum these over shards).

    The fast form takes float32 norms and squares them in float64 (a float32 square would
    overflow above ~1.8e19 and the clip would then silently zero the update). A norm whose float32
    reduction itself overflows (finite entries whose squares sum past float32's range) comes out
    as Inf; it is never checked here, because that check would be a device-to-host read on every
    step. The caller reads all statistics once and redoes the rare non-finite case with
    ``precise=True``: every norm accumulated in float64, slow but exact.
    """
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    if precise:
        norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
        return torch.stack(norms).square()
    fp32 = [t if t.dtype == torch.float32 else t.float() for t in tensors]
    return torch.stack(torch._foreach_norm(fp32)).double().square()


def clip_factors(sq_norms: Sequence[float]) -> list[float]:
    """Per-tensor clip factor: 1 / ||c||_F where ||c||_F > 1, else 1 (threshold fixed at 1)."""
    norms = [math.sqrt(x) for x in sq_norms]
    return [1.0 / n if n > 1.0 else 1.0 for n in norms]


def update_momentum_(
    exp_avgs: list[Tensor], cs: list[Tensor], factors: list[float], *, momentum: float
) -> None:
    """M <- beta M + (1 - beta) * factor * c, in place (``cs`` is consumed as scratch space)."""
    if not exp_avgs:
        return
    # Only clipped c_t need the extra pass: multiplying by 1.0 changes nothing.
    clipped = [(c, f) for c, f in zip(cs, factors, strict=True) if f != 1.0]
    if clipped:
        torch._foreach_mul_([c for c, _ in clipped], [f for _, f in clipped])
    torch._foreach_lerp_(exp_avgs, cs, 1.0 - momentum)


def apply_matrix_update_(
    params: list[Tensor],
    orthos: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    scales: list[float],
    scratch: Scratch | None = None,
) -> None:
    """W <- W (1 - lr wd) - lr s O: decay with the unscaled lr, then the scaled orthogonal step.
    ``scratch``: where a CPU O of another dtype is converted (the result is the same bits)."""
    # A loop, not foreach: O (bf16) and W (float32) differ in dtype, so foreach would take its
    # per-tensor fallback anyway, and the scale s differs per matrix.
    for p, o, s in zip(params, orthos, scales, strict=True):
        o = o.reshape(p.shape)
        # add_ with O of another dtype converts it to W's into a fresh tensor first; on a CPU,
        # converting into kept memory instead saves the fresh pages (see Scratch).
        if o.dtype != p.dtype and scratch is not None:
            kept = scratch.views([o], p.dtype)
            if kept is not None:
                o = kept[0].copy_(o)
        p.mul_(1.0 - lr * weight_decay).add_(o, alpha=-lr * s)


def adamw_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scratch: Scratch | None = None,
) -> None:
    """The AdamW-branch update (docs/algorithm.md section 5), in place.

    Unlike ``torch.optim.AdamW``, eps is added to the *uncorrected* sqrt(v) and the bias
    corrections are folded into the step size: u = m / (eps + sqrt(v)),
    W <- W (1 - lr wd) - lr u sqrt(1 - beta2^k) / (1 - beta1^k). ``steps`` holds each tensor's k,
    already incremented. ``scratch``: where sqrt(v) + eps is formed on a CPU (the same bits).
    """
    if not params:
        return
    beta1, beta2 = betas
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = scratch.views(exp_avg_sqs) if scratch is not None else None
    if denom is None:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    else:
        for v, d in zip(exp_avg_sqs, denom, strict=True):
            torch.sqrt(v, out=d)
    torch._foreach_add_(denom, eps)
    step_sizes = [-lr * math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k) for k in steps]
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def fused_adamw_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[int],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """:func:`adamw_update_` through torch's fused AdamW kernel, one pass over each tensor.

    torch's kernel adds its eps to the *corrected* sqrt(v): m_hat / (sqrt(v_hat) + eps'). With
    eps' = eps / sqrt(1 - beta2^k) that is the spec's m / (eps + sqrt(v)) sqrt(1 - beta2^k) /
    (1 - beta1^k) exactly in real arithmetic; m and v come out bit for bit, W within rounding of
    the unfused path (the kernel orders the decay and the update differently). Tensors are grouped
    by their step k (eps' depends on it). All tensors share one device and dtype (the caller
    checks :func:`fused_adamw_serves`).
    """
    beta1, beta2 = betas
    by_step: dict[int, list[int]] = {}
    for i, k in enumerate(steps):
        by_step.setdefault(k, []).append(i)
    for k, idx in by_step.items():
        step = torch.full((), float(k), device=params[0].device)
        torch._fused_adamw_(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [], [step] * len(idx), lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, eps=eps / math.sqrt(1.0 - beta2**k), amsgrad=False,
            maximize=maximize)


def fused_adamw_serves(tensors: Sequence[Tensor]) -> bool:
    """True if torch's fused AdamW kernel takes these (one floating dtype, one CPU/CUDA device)."""
    if not tensors or not hasattr(torch, "_fused_adamw_"):
        return False
    first = tensors[0]
    return (first.device.type in ("cpu", "cuda") and first.dtype in (torch.float32, torch.bfloat16,
                                                                     torch.float16, torch.float64)
            and all(t.device == first.device and t.dtype == first.dtype for t in tensors))


def nonfinite_flag(tensors: list[Tensor], device: torch.device) -> Tensor:
    """A float64 vector of one element on ``device``: 0 if every tensor is finite, NaN otherwise.

    Summed with other per-step statistics (one all-reduce when sharded), the NaN survives. It
    stays on the device: the step reads it on the host together with everything else, once.
    """
    tensors = [t for t in tensors if t.numel()]  # an empty shard has no max (and is finite)
    if not tensors:
        return torch.zeros(1, dtype=torch.float64, device=device)
    # CPU fast path: the max-abs norm below is ~10x slower there than a 2-norm (122 ms vs 12 ms
    # for GPT-2's 50257x768 embedding gradient, 1 thread). A finite 2-norm proves every element
    # finite; only a non-finite one (NaN/Inf, or float32 overflow of the squares of entries above
    # ~1e19) needs the exact check. Not on GPUs: both run at memory speed, and reading the 2-norm
    # on the host would be a device sync.
    on_cpu = tensors[0].device.type == "cpu"
    if on_cpu and bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
        return torch.zeros(1, dtype=torch.float64, device=device)
    # The max-abs norm is NaN/Inf exactly when the tensor holds one; it never overflows.
    worst = torch.stack(torch._foreach_norm(tensors, float("inf"))).double().amax()
    return (worst * 0.0).reshape(1).to(device)
