"""Sections d, e, g: MARSM on the device against the CPU, its host syncs per step, and its step
time against torch.optim.Muon (+AdamW) and torch.optim.AdamW."""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from marsm_dist import MARSM, param_groups
from marsm_dist.diagnostics import HostReads

from .core import Ctx, Skip, log, run_checks

CORRECTNESS_STEPS = 10
REL_TOL = 1e-4


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32) inside the block, restored after: with TF32 a
    GPU's float32 Newton-Schulz would differ from the CPU's by ~1e-3, not rounding noise."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the matmul flag below, through the stable API
    legacy = None
    try:
        # torch >= 2.9 raises on these legacy flags once something set the new fp32_precision API;
        # then set_float32_matmul_precision above already did the matmul part.
        legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except RuntimeError:
        pass
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)
        if legacy is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


def _problem():
    try:
        from tests.helpers import problem
    except ImportError as err:
        raise Skip(f"tests/helpers/problem.py not importable ({err}); run from the repository root") from err
    return problem


def _trajectory(device: torch.device, dtype: torch.dtype, approx: bool) -> dict[str, torch.Tensor]:
    """tests/helpers/problem.py's problem (every parameter kind, three group styles, an LR schedule)
    stepped by MARSM on ``device`` in ``dtype`` with Newton-Schulz in ``dtype``; final weights."""
    problem = _problem()
    params = {n: p.to(device).requires_grad_() for n, p in problem.initial_params(dtype).items()}
    opt = MARSM(problem.groups(params), lr=problem.BASE_LR, ns_dtype=dtype, approx=approx)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, problem.schedule)

    def loss(t: int) -> torch.Tensor:  # problem.loss with its data moved to the device
        total = torch.zeros((), dtype=dtype, device=device)
        for n, (x, y) in problem.batch(t, dtype).items():
            W, x, y = params[n], x.to(device), y.to(device)
            total = total + problem.GRAD_SCALE[n] * (torch.tanh(W * x).sum() + 0.5 * ((W - y) ** 2).sum())
        return total

    for t in range(CORRECTNESS_STEPS):
        if not approx:
            loss(t + 1).backward()
            opt.store_lookahead_grad()
            opt.zero_grad()
        loss(t).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {n: p.detach().cpu().double() for n, p in params.items()}


def _compare(ctx: Ctx, approx: bool) -> dict:
    # GPU: CUDA float32 vs CPU float32. Dry: CPU float32 vs a CPU float64 run (CPU vs CPU in the
    # same dtype would be the same computation and could not fail).
    with full_fp32():
        got = _trajectory(ctx.device, torch.float32, approx)
        ref_dtype = torch.float64 if ctx.dry else torch.float32
        want = _trajectory(torch.device("cpu"), ref_dtype, approx)
    start = {n: p.double() for n, p in _problem().initial_params(torch.float64).items()}
    rel = {n: ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item() for n in got}
    moved = min((want[n] - start[n]).abs().max().item() for n in want)
    worst = max(rel, key=rel.get)
    out = {"against": f"cpu {ref_dtype}".replace("torch.", ""), "max_rel_diff": rel[worst], "worst": worst,
           "rel_diff": rel, "min_param_moved": moved, "tolerance": REL_TOL, "problems": []}
    if rel[worst] > REL_TOL:
        out["problems"].append(f"max relative difference {rel[worst]:.2e} ({worst}) > {REL_TOL:g}")
    if moved < 1e-3:
        out["problems"].append(f"the parameters hardly moved ({moved:.1e}): the comparison proves nothing")
    return out


def _steps_without_error(device: torch.device, make) -> dict:
    """Three steps of an optimizer on fresh parameters; finite and moved afterwards."""
    params, opt, closure = make(device)
    before = [p.detach().clone() for p in params]
    for _ in range(3):
        opt.zero_grad()
        closure()
        opt.step()
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(params, before, strict=True))
    problems = [] if finite and moved > 0 else [f"finite={finite}, moved={moved:.1e}"]
    return {"params": len(params), "finite": finite, "max_moved": moved, "problems": problems}


def _matrices_only(device: torch.device):
    # Square, tall, wide and repeated shapes (stacked into one batch on GPUs), one use_marsm group.
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 64), (192, 64), (64, 256), (256, 64), (64, 64), (48, 80), (3, 3)]
    params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device)) for s in shapes]
    opt = MARSM([{"params": params, "use_marsm": True}], lr=0.01)

    def closure() -> None:
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device)

    return params, opt, closure


def _mixed_groups(device: torch.device):
    try:
        # every parameter kind: matrices, embeddings, tied head, 1-D
        from tests.helpers.fsdp2_models import GPT
    except ImportError as err:
        raise Skip(f"tests/helpers/fsdp2_models.py not importable ({err}); run from the repository "
                   "root") from err
    torch.manual_seed(0)
    model = GPT(d=64, layers=2, heads=4, seq_len=32).to(device)
    opt = MARSM(param_groups(model), lr=0.01)
    x = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1)).to(device)
    return list(model.parameters()), opt, lambda: model(x[:, :-1], x[:, 1:]).backward()


def correctness(ctx: Ctx) -> dict:
    """Section d."""
    checks = run_checks({
        "trajectory_approx": lambda: _compare(ctx, True),
        "trajectory_exact": lambda: _compare(ctx, False),
        "matrices_only": lambda: _steps_without_error(ctx.device, _matrices_only),
        "mixed_groups": lambda: _steps_without_error(ctx.device, _mixed_groups),
    })
    traj = [c.get("max_rel_diff") for n, c in checks.items() if n.startswith("traj") and "max_rel_diff" in c]
    diff = f"max rel diff {max(traj):.1e}" if traj else "no trajectory compared"
    return {"checks": checks, "summary": f"{diff} (tol {REL_TOL:g}); " + ", ".join(
        f"{n} {c['status']}" for n, c in checks.items() if not n.startswith("traj"))}


def gpt2_optimizer(device: torch.device, layers: int, model: str = "gpt2-small") -> MARSM:
    """MARSM over GPT-shaped parameters (benchmarks/optimizer_step.py's shapes) with fixed grads."""
    from benchmarks.shapes import model_shapes

    matrices, others = model_shapes(model, layers)
    gen = torch.Generator().manual_seed(0)

    def param(shape: tuple[int, ...]) -> torch.nn.Parameter:
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device))
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
        return p

    return MARSM([{"params": [param(s) for s in matrices], "use_marsm": True},
                  {"params": [param(s) for s in others], "use_marsm": False}], lr=1e-3)


def host_syncs(ctx: Ctx) -> dict:
    """Section e: device-to-host reads in a steady-state step (the 4th), GPT-2-small shapes. Dry
    mode uses the meta device, which takes the GPU code paths (the CPU has no host reads)."""
    device = torch.device("meta") if ctx.dry else ctx.device
    opt = gpt2_optimizer(device, 12)
    for _ in range(3):  # the first step builds the plan and the state
        with HostReads():  # (on meta it answers the reads, which would fail otherwise)
            opt.step()
    with HostReads() as reads:
        opt.step()
    out = {"device": str(device), "host_reads": reads.count, "where": reads.where[:20], "target": 1}
    if device.type == "cuda":
        inside, outside = _sync_warnings(opt)
        out["sync_debug_warnings"] = len(inside)
        out["sync_debug_where"] = inside[:20]
        # Synchronizations outside opt.step() (switching the mode, say) are listed, not counted.
        out["sync_debug_outside_step"] = outside[:5]
    else:
        out["sync_debug_warnings"] = None
        out["sync_debug_note"] = "torch.cuda.set_sync_debug_mode needs CUDA (dry mode: HostReads only)"
    counts = [c for c in (out["host_reads"], out["sync_debug_warnings"]) if c is not None]
    out["target_met"] = max(counts) <= 1
    out["summary"] = (f"{out['host_reads']} host read(s)/step"
                      + (f", {out['sync_debug_warnings']} sync warning(s)" if device.type == "cuda" else "")
                      + f" on {device.type} (target 1: {'met' if out['target_met'] else 'NOT met'})")
    return out


def _sync_warnings(opt: torch.optim.Optimizer) -> tuple[list[str], list[str]]:
    """One step under ``torch.cuda.set_sync_debug_mode("warn")``: where each synchronizing CUDA
    operation happened (the innermost frames of its Python stack), split into those inside
    ``opt.step()`` and the others. The stack is taken when the warning is shown, because the
    warning itself only names the innermost Python line."""
    inside: list[str] = []
    outside: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in Path(f.filename).name]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        in_step = any(f.name == "_step_under_watch" for f in frames)
        (inside if in_step else outside).append(where)

    def _step_under_watch() -> None:
        opt.step()

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _step_under_watch()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return inside, outside


def step_time(ctx: Ctx) -> dict:
    """Section g: median optimizer step ms on GPT-2-small shapes (12 layers; dry: the demo model)."""
    from benchmarks import optimizer_step as bench
    from benchmarks import roofline
    from benchmarks.shapes import model_shapes

    model, layers = ("demo", 1) if ctx.dry else ("gpt2-small", 12)
    kinds = ["marsm", "marsm-fp32-ns", "muon+adamw", "muon[marsm-ns]+adamw", "adamw"]
    warmup, repeats = (1, 3) if ctx.dry else (3, 20)
    matrices, others = model_shapes(model, layers)
    log(f"  step_time: {model} x{layers}, rows {kinds}, median of {repeats}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch Muon warns about its lr adjustment once per build
        rows = bench.run(kinds, matrices, others, warmup, repeats, ctx.device)
    # The step's physical floor (benchmarks/roofline.py), measured now on this device.
    floors = bench.add_floors(rows, matrices, others, ctx.device)
    for floor in floors.values():
        log(f"  step_time: {roofline.describe(floor)}")
    ms = {k: 1e3 * r["step_seconds"] for k, r in rows.items()}
    ratio = {k: v / ms["muon+adamw"] for k, v in ms.items()}
    multiple = {k: r["floor_multiple"] for k, r in rows.items()}
    return {"model": model, "layers": layers, "repeats": repeats, "step_ms": ms, "ratio_to_muon": ratio,
            "floor_ms": {d: 1e3 * f["floor_seconds"] for d, f in floors.items()}, "floor_multiple": multiple,
            "floors": floors, "all_ms": {k: [1e3 * t for t in r["all_seconds"]] for k, r in rows.items()},
            "summary": f"marsm {ms['marsm']:.2f} ms = {ratio['marsm']:.2f}x muon+adamw "
                       f"({ms['muon+adamw']:.2f} ms), {multiple['marsm']:.2f}x its floor "
                       f"({1e3 * floors['bfloat16']['floor_seconds']:.2f} ms); adamw {ms['adamw']:.2f} ms"}
