"""Sections a-c: the environment, the measured bf16 matmul rate, and Newton-Schulz throughput
(MARSM's batched path and torch.optim.Muon's own function) on GPT-2-small and Llama-3-8B shapes."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import platform
from collections import Counter
from collections.abc import Callable

import torch

from benchmarks.shapes import model_shapes
from marsm_dist.newton_schulz import NS_COEFFICIENTS, newton_schulz_flops
from marsm_dist.orthogonalize import NSConfig, orthogonalize

from .core import Ctx, Skip, log, median, time_op

NS_STEPS = 5


def _version(dist_name: str, module: str) -> str | None:
    """The installed version of a package, or None when it cannot be imported (not imported here:
    megatron's import alone takes seconds)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def env(ctx: Ctx) -> dict:
    """Section a: versions and devices."""
    out: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
                 "check_device": str(ctx.device), "cpu_threads": torch.get_num_threads(),
                 "deepspeed": _version("deepspeed", "deepspeed"),
                 "megatron_core": _version("megatron-core", "megatron.core")}
    try:
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:  # CPU builds have no NCCL
        out["nccl"] = None
        out["nccl_error"] = f"{type(err).__name__}: {err}"[:200]
    if torch.cuda.is_available():
        out["devices"] = [{"name": torch.cuda.get_device_name(i),
                           "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                           "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                          for i in range(torch.cuda.device_count())]
        out["cudnn"] = torch.backends.cudnn.version()
    name = out["devices"][0]["name"] if out.get("devices") else platform.processor() or platform.machine()
    out["summary"] = (f"torch {out['torch']}, CUDA {out['cuda']}, NCCL {out['nccl']}, "
                      f"{out['device_count']} x {name}")
    return out


def matmul(ctx: Ctx) -> dict:
    """Section b: bf16 n^3 matmul rate, the ceiling Newton-Schulz is measured against."""
    n = 256 if ctx.dry else 8192
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16, generator=gen)
    times = time_op(lambda: a @ b, ctx.device, warmup=3, repeats=10)
    tflops = [2 * n**3 / t / 1e12 for t in times]
    rate = median(tflops)
    return {"n": n, "dtype": "bfloat16", "ms_median": 1e3 * median(times), "tflops": rate,
            "tflops_all": tflops, "summary": f"{rate:.3g} TFLOP/s ({n}^3 bf16, median of 10)"}


def model_matrices(name: str, dry: bool, llama_layers: int) -> list[tuple[int, ...]]:
    """The hidden-matrix shapes (out, in) MARS-M orthogonalizes; dry mode takes tiny models."""
    if dry:
        return model_shapes({"gpt2-small": "demo", "llama3-8b": "llama3-tiny"}[name], 1)[0]
    return model_shapes(name, llama_layers if name == "llama3-8b" else None)[0]


def find_torch_muon_ns() -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """torch.optim.Muon's Newton-Schulz function as ``fn(matrix)``, and its qualified name.

    torch keeps it private (``torch.optim._muon._zeropower_via_newtonschulz`` in 2.9-2.13), so it
    is looked up by name and signature; :class:`Skip` if this torch has nothing recognisable.
    """
    try:
        module = importlib.import_module("torch.optim._muon")
    except ImportError as err:
        raise Skip(f"torch {torch.__version__} has no torch.optim._muon ({err})") from err
    names = [n for n in dir(module) if "newtonschulz" in n.lower() or "zeropower" in n.lower()]
    for name in names:
        fn = getattr(module, name)
        if not callable(fn):
            continue
        params = set(inspect.signature(fn).parameters)
        if {"ns_coefficients", "ns_steps", "eps"} <= params:
            return (lambda g, fn=fn: fn(g, ns_coefficients=NS_COEFFICIENTS, ns_steps=NS_STEPS, eps=1e-7),
                    f"{module.__name__}.{name}{inspect.signature(fn)}")
    raise Skip(f"no Newton-Schulz function with (ns_coefficients, ns_steps, eps) in torch.optim._muon "
               f"of torch {torch.__version__} (candidates: {names})")


def _rate(fn: Callable[[], object], ctx: Ctx, flops: int, ceiling: float | None, reps: int) -> dict:
    times = time_op(fn, ctx.device, warmup=1, repeats=reps)
    tflops = flops / median(times) / 1e12
    return {"ms_median": 1e3 * median(times), "tflops": tflops,
            "fraction_of_matmul": tflops / ceiling if ceiling else None}


def newton_schulz(ctx: Ctx) -> dict:
    """Section c: NS TFLOP/s per model, MARSM's batched path vs torch Muon's one-at-a-time function."""
    mm = ctx.found.get("matmul", {})
    ceiling = mm.get("tflops") if mm.get("status") == "ok" else None
    cfg = NSConfig(steps=NS_STEPS, dtype=torch.bfloat16, coefficients=NS_COEFFICIENTS)
    try:
        muon_ns, muon_name = find_torch_muon_ns()
    except Skip as why:
        muon_ns, muon_name = None, str(why)
    reps = 1 if ctx.dry else 3
    out: dict = {"dtype": "bfloat16", "steps": NS_STEPS, "matmul_tflops": ceiling,
                 "torch_muon_function": muon_name, "models": {}}
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    for model in ("gpt2-small", "llama3-8b"):
        shapes = model_matrices(model, ctx.dry, ctx.llama_layers)
        log(f"  newton_schulz: {model}, {len(shapes)} matrices")
        # float32 inputs, as the optimizer hands its momenta to orthogonalize().
        mats = [torch.randn(s, device=ctx.device, generator=gen) for s in shapes]
        flops = sum(newton_schulz_flops(s, NS_STEPS, form="auto", dtype=torch.bfloat16) for s in shapes)
        row: dict = {"shapes": {str(s): c for s, c in Counter(shapes).items()}, "gflop": flops / 1e9,
                     "layers": len(shapes) // (4 if model == "gpt2-small" else 7)}
        row["marsm"] = _rate(lambda m=mats: orthogonalize(m, [cfg] * len(m)), ctx, flops, ceiling, reps)
        # One entry per batch orthogonalize() forms: same shape up to a transpose (an MLP's two).
        row["marsm_per_batch"] = {}
        for small, large in sorted({tuple(sorted(s)) for s in shapes}):
            group = [m for m in mats if sorted(m.shape) == [small, large]]
            f = newton_schulz_flops((small, large), NS_STEPS, dtype=torch.bfloat16) * len(group)
            row["marsm_per_batch"][f"{len(group)}x{small}x{large}"] = _rate(
                lambda g=group: orthogonalize(g, [cfg] * len(g)), ctx, f, ceiling, reps)
        if muon_ns is not None:
            row["torch_muon"] = _rate(lambda m=mats: [muon_ns(x) for x in m], ctx, flops, ceiling, reps)
            row["marsm_speedup_vs_torch_muon"] = row["torch_muon"]["ms_median"] / row["marsm"]["ms_median"]
        out["models"][model] = row
        del mats
    out["summary"] = "; ".join(_summary(name, row) for name, row in out["models"].items())
    return out


def _summary(model: str, row: dict) -> str:
    def pct(r: dict) -> str:
        f = r.get("fraction_of_matmul")
        return f"{r['tflops']:.3g} TF/s" + (f" ({100 * f:.0f}%)" if f else "")

    text = f"{model}: marsm {pct(row['marsm'])}"
    if "torch_muon" in row:
        text += f", torch muon {pct(row['torch_muon'])}"
    return text
