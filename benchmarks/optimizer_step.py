"""Single-process optimizer step time: MARSM vs torch.optim.Muon (+AdamW) vs torch.optim.AdamW.

    python benchmarks/optimizer_step.py [--model gpt2-small --layers 2] [--repeats 5] [--threads 1]
                                        [--skip muon+adamw,marsm-torch-bf16] [--json out.json]
                                        [--device cpu|cuda] [--cpu-kinds this|native,avx2]

Every optimizer steps its own copy of the same parameters with the same fixed gradients. After
``--warmup`` steps each, the optimizers take turns step by step (round robin), so a load change on
a shared machine hits every row alike; the table reports the median of ``--repeats`` steps and
each as a ratio to torch.optim.Muon measured in the same run. Muon gets torch.optim.AdamW for the
non-matrix parameters, as MARSM has its own AdamW branch, so both steps cover the whole model.
torch.optim.AdamW runs fused (``fused=True``) where torch has a fused kernel for the device, else
foreach.

Roofline: after the steps, the same run measures the matmul rate at the model's Newton-Schulz
shapes and the copy bandwidth (benchmarks/roofline.py) and prints the MARS-M step's physical floor
(Newton-Schulz FLOPs at that rate + the bytes the step must move at that bandwidth) and every row
as a multiple of it ("x floor"): rows with float32 Newton-Schulz against the float32 floor, the
others against the bf16 one. The floor counts the plain form's FLOPs, so a Gram-form row
(marsm-fp32-ns) can come out below 1x; the AdamW row is judged by the MARS-M floor too (its own
floor would be the memory part alone, the AdamW bytes of every element).

Rows:
  marsm                 the default: bf16 Newton-Schulz, form "auto" (plain in bf16)
  marsm-fused           the same with fused=True: the AdamW branch through torch's fused kernel
  marsm-fp32-ns         float32 Newton-Schulz, form "auto" (Gram form where it is cheaper)
  marsm-fp32-ns-plain   float32 Newton-Schulz, plain form
  marsm-torch-bf16      bf16 through torch's own CPU kernels (only where marsm emulates bf16,
                        i.e. on a CPU without bf16 matmul; see marsm_dist/newton_schulz.py)
  muon+adamw            torch.optim.Muon with its own bf16 Newton-Schulz, + torch.optim.AdamW
  muon[marsm-ns]+adamw  torch.optim.Muon with its NS function swapped for marsm's plain bf16 one:
                        the same bf16 matmul path as MARSM, so the ratio isolates the step logic
  adamw                 torch.optim.AdamW on everything

The JSON (default benchmarks/results/optimizer_step.json) keeps one entry per model and layer
count, so the GPT-2 and demo runs sit side by side.

Which kind of CPU a figure comes from matters more than anything else here: on a CPU with native
bf16 matmul kernels (AVX-512-BF16/AMX: oneDNN) torch's bf16 products are ~2x faster than float32;
on an AVX2-only CPU torch falls back to a scalar bf16 loop 40-80x slower, so MARSM emulates bf16
there (float32 products rounded to bf16) and torch.optim.Muon as shipped crawls. Every table says
which kind it ran on. ``--cpu-kinds native,avx2`` measures both in one invocation on a native-bf16
machine: the AVX2 kind runs in a child process with oneDNN, MKL and ATen limited to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``), which
reproduces an AVX2 CPU's kernels (oneDNN then reports no bf16 support and torch takes its scalar
bf16 fallback). There, the rows that run torch's bf16 fallback (muon+adamw, marsm-torch-bf16)
take over a minute per step at GPT-2 shapes, so they are timed once, without warm-up.

``--device cuda`` runs the same rows on the GPU (the CPU-only row marsm-torch-bf16 is left out):
the device is synchronized before and after each timed step, and MARSM runs without its phase
timing (which would add synchronizations inside the step), so no phase split is shown there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks import roofline  # noqa: E402
from benchmarks.cpu_kinds import HELP, cpu_kind, describe, machine, run_kinds  # noqa: E402
from benchmarks.results_file import save_results  # noqa: E402
from benchmarks.shapes import model_shapes  # noqa: E402
from marsm_dist import MARSM  # noqa: E402

ns_module = importlib.import_module("marsm_dist.newton_schulz")  # the package re-exports the function
muon_module = importlib.import_module("torch.optim._muon")

# Rows that run torch's scalar bf16 fallback where bf16 is emulated: timed once there.
FALLBACK_ROWS = ("muon+adamw", "marsm-torch-bf16")

ROWS = ("marsm", "marsm-fused", "marsm-fp32-ns", "marsm-fp32-ns-plain", "marsm-torch-bf16", "muon+adamw",
        "muon[marsm-ns]+adamw", "adamw")
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "optimizer_step.json"


@contextlib.contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def marsm_ns_for_muon(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch Muon's NS signature, computed by marsm's plain bf16 Newton-Schulz."""
    return ns_module.newton_schulz(grad, ns_steps, coefficients=tuple(ns_coefficients), eps=eps, form="plain")


def adamw(params: list[torch.nn.Parameter], device: str | torch.device) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused where torch has a fused kernel for the device, else foreach."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices as fused_devices

    fast = {"fused": True} if torch.device(device).type in fused_devices() else {"foreach": True}
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), **fast)


def build(kind: str, matrices, others, device: str | torch.device = "cpu",
          ) -> tuple[list[torch.optim.Optimizer], Callable[[], object]]:
    """The optimizers of one row and the context its steps run in (values drawn on the CPU, so
    every device gets the same numbers)."""
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in matrices]
    rest = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in others]
    for p in mats + rest:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    on_cpu = torch.device(device).type == "cpu"
    context: Callable[[], object] = contextlib.nullcontext
    if kind.startswith("marsm"):
        dtype = torch.float32 if "fp32" in kind else torch.bfloat16
        form = "plain" if kind.endswith("plain") else "auto"
        groups = [{"params": mats, "use_marsm": True, "ns_form": form}, {"params": rest, "use_marsm": False}]
        opts = [MARSM(groups, lr=1e-3, ns_dtype=dtype, timing=on_cpu, fused=kind == "marsm-fused")]
        if kind == "marsm-torch-bf16":
            context = lambda: patched(ns_module, "EMULATE_CPU_BF16", False)  # noqa: E731
    elif kind.startswith("muon"):
        opts = [torch.optim.Muon(mats, lr=1e-3, adjust_lr_fn="match_rms_adamw"), adamw(rest, device)]
        if kind == "muon[marsm-ns]+adamw":
            context = lambda: patched(muon_module, "_zeropower_via_newtonschulz", marsm_ns_for_muon)  # noqa: E731
    elif kind == "adamw":
        opts = [adamw(mats + rest, device)]
    else:
        raise ValueError(kind)
    return opts, context


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_once(opts: list[torch.optim.Optimizer], context: Callable[[], object],
              device: str | torch.device = "cpu") -> float:
    with context():
        _sync(device)
        t0 = time.perf_counter()
        for o in opts:
            o.step()
        _sync(device)
        return time.perf_counter() - t0


def run(kinds: list[str], matrices, others, warmup: int, repeats: int,
        device: str | torch.device = "cpu", once: tuple[str, ...] = ()) -> dict[str, dict]:
    """Median step seconds per row (round robin over rows), plus MARSM's phase split (CPU).
    Rows in ``once`` are timed on their first step only (no warm-up)."""
    built = {k: build(k, matrices, others, device) for k in kinds}
    for k, (opts, context) in built.items():
        for _ in range(0 if k in once else warmup):
            step_once(opts, context, device)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    phases: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for rep in range(repeats):
        for k, (opts, context) in built.items():
            if k in once and rep:
                continue
            times[k].append(step_once(opts, context, device))
            stats = getattr(opts[0], "last_step_stats", None)
            if stats is not None:
                phases[k].append(stats.milliseconds)
    out = {}
    for k in kinds:
        row = {"step_seconds": statistics.median(times[k]), "all_seconds": times[k]}
        if phases[k]:
            row["phase_ms"] = {p: statistics.median(d[p] for d in phases[k]) for p in phases[k][0]}
        out[k] = row
    return out


def add_floors(rows: dict[str, dict], matrices, others, device: str | torch.device) -> dict[str, dict]:
    """Measure the step's floor (benchmarks/roofline.py) per Newton-Schulz dtype the rows use and
    give every row its multiple of the floor of its dtype; the floors by dtype name."""
    def dtype_of(kind: str) -> torch.dtype:
        return torch.float32 if "fp32" in kind else torch.bfloat16

    dtypes = sorted({dtype_of(k) for k in rows}, key=lambda d: d != torch.bfloat16)  # bfloat16 first
    floors = roofline.floors(matrices, others, device, dtypes)
    for kind, row in rows.items():
        floor = floors[str(dtype_of(kind)).replace("torch.", "")]
        row["floor_seconds"] = floor["floor_seconds"]
        row["floor_multiple"] = row["step_seconds"] / floor["floor_seconds"]
    return floors


def print_table(rows: dict[str, dict]) -> None:
    bases = [b for b in ("muon+adamw", "muon[marsm-ns]+adamw") if b in rows]
    head = f"{'optimizer':<22} {'step ms':>9} {'x floor':>8}" + "".join(f" {'vs ' + b:>22}" for b in bases)
    phase_names = next((list(r["phase_ms"]) for r in rows.values() if "phase_ms" in r), [])
    print(head + "   MARSM phases ms: " + " / ".join(phase_names))
    for kind, row in rows.items():
        sec = row["step_seconds"]
        line = f"{kind:<22} {1e3 * sec:>9.1f} {row.get('floor_multiple', float('nan')):>7.2f}x"
        line += "".join(f" {sec / rows[b]['step_seconds']:>21.2f}x" for b in bases)
        if "phase_ms" in row:
            line += "   " + " / ".join(f"{v:.1f}" for v in row["phase_ms"].values())
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "demo"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads; use 1 on a shared machine (2 threads on 2 busy cores thrash)")
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--key", default=None,
                    help="entry name in the JSON (default: MODEL-LAYERSL, with -cuda appended on the GPU)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cpu-kinds", default="this", help=HELP + " (module doc)")
    args = ap.parse_args()
    if args.cpu_kinds != "this" and args.device == "cpu":
        run_kinds(args.cpu_kinds, __file__)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - set(ROWS):
        raise SystemExit(f"unknown rows in --skip: {sorted(unknown)}; rows are {ROWS}")
    emulated = ns_module.emulates_bfloat16("cpu")
    kind = cpu_kind() if args.device == "cpu" else args.device
    if not emulated or args.device != "cpu":  # the row would be a second copy of "marsm"
        skip.add("marsm-torch-bf16")
    kinds = [k for k in ROWS if k not in skip]
    matrices, others = model_shapes(args.model, args.layers)
    n_mat = sum(torch.Size(s).numel() for s in matrices)
    n_rest = sum(torch.Size(s).numel() for s in others)
    print(describe() if args.device == "cpu" else f"device: {torch.cuda.get_device_name()}")
    print(f"{args.model}, {args.layers} layers: {len(matrices)} matrices ({n_mat:,} elements), "
          f"{len(others)} AdamW tensors ({n_rest:,}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; bf16 NS emulated in float32: {emulated}; "
          f"median of {args.repeats} round-robin steps after {args.warmup} warm-up"
          + ("" if args.device == "cpu" else f"; on {torch.cuda.get_device_name()}"))
    once = FALLBACK_ROWS if emulated and args.device == "cpu" else ()
    rows = run(kinds, matrices, others, args.warmup, args.repeats, args.device, once)
    floors = add_floors(rows, matrices, others, args.device)
    for floor in floors.values():
        print(roofline.describe(floor))
    print_table(rows)
    key = args.key or f"{args.model}-{args.layers}L-{kind}"
    found = machine() | ({"device": torch.cuda.get_device_name()} if args.device == "cuda" else {})
    save_results(args.json, key, args, found, rows, floors=floors)


if __name__ == "__main__":
    main()
