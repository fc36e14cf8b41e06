"""MARSM against torch.optim.Muon on the matrices of two GPT-2-small blocks: the acceptance comparison.

    python benchmarks/muon_parity.py [--threads 1,2] [--cpu-kinds this|native,avx2] [--profile]

The 8 matrices of two GPT-2-small blocks, (2304, 768), (768, 768), (3072, 768), (768, 3072) twice
(``--dim`` scales them), float32 ``nn.Parameter`` s; ``MARSM([{"params": ps, "use_marsm": True}])``
at its defaults against ``torch.optim.Muon(ps2, adjust_lr_fn="match_rms_adamw")``, both with bf16
Newton-Schulz. Every step gets fresh gradients (``torch.randn``, the same for both, drawn outside
the timing). After ``--warmup`` steps each, ``--pairs`` interleaved pairs, MARSM first in even
pairs and Muon first in odd ones; the median step of each, their ratio MARSM/Muon, and MARSM's
phase split (``last_step_stats``) of its step nearest the median. Per ``--threads`` count
(``torch.set_num_threads``). ``--profile`` prints torch.profiler's top 15 ops by self CPU time of
one MARSM step (at the first thread count).

On a CPU without bf16 matmul kernels (the avx2 kind of ``--cpu-kinds``, benchmarks/cpu_kinds.py)
torch.optim.Muon as shipped runs torch's scalar bf16 fallback, over a minute a step here, while
MARSM emulates bf16 in float32. There the pairs run Muon with its Newton-Schulz function swapped
for MARSM's (the same matmuls: the ratio isolates the rest of the step), and Muon as shipped is
timed once per thread count, without warm-up; both are reported.

JSON: benchmarks/results/muon_parity.json, one entry per CPU kind.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.cpu_kinds import HELP, cpu_kind, describe, machine, run_kinds  # noqa: E402
from benchmarks.optimizer_step import marsm_ns_for_muon, muon_module, patched  # noqa: E402
from benchmarks.results_file import save_results  # noqa: E402
from marsm_dist import MARSM  # noqa: E402
from marsm_dist.newton_schulz import emulates_bfloat16  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "muon_parity.json"


def shapes(d: int = 768) -> list[tuple[int, int]]:
    """The matrices of two GPT-2 blocks of width ``d``: fused QKV, attention out, MLP in, MLP out."""
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * 2


def build(d: int, swap_ns: bool):
    """(MARSM, Muon, each's parameters, Muon's step context): the same initial values for both."""
    gen = torch.Generator().manual_seed(0)
    init = [0.02 * torch.randn(s, generator=gen) for s in shapes(d)]
    ps = [torch.nn.Parameter(w.clone()) for w in init]
    ps2 = [torch.nn.Parameter(w.clone()) for w in init]
    marsm = MARSM([{"params": ps, "use_marsm": True}])
    muon = torch.optim.Muon(ps2, adjust_lr_fn="match_rms_adamw")
    context = (lambda: patched(muon_module, "_zeropower_via_newtonschulz", marsm_ns_for_muon)) if swap_ns \
        else contextlib.nullcontext
    return marsm, muon, ps, ps2, context


def fresh_grads(ps: list[torch.nn.Parameter], ps2: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    for p, q in zip(ps, ps2, strict=True):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()


def timed(opt: torch.optim.Optimizer, context=contextlib.nullcontext) -> float:
    with context():
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0


def parity(threads: int, d: int, warmup: int, pairs: int, emulated: bool) -> dict:
    """One thread count: the interleaved pairs (module doc), and shipped Muon once where emulated."""
    torch.set_num_threads(threads)
    marsm, muon, ps, ps2, context = build(d, swap_ns=emulated)
    gen = torch.Generator().manual_seed(1)
    for _ in range(warmup):
        fresh_grads(ps, ps2, gen)
        timed(marsm), timed(muon, context)
    t_marsm, t_muon, phases = [], [], []
    for i in range(pairs):
        fresh_grads(ps, ps2, gen)
        if i % 2:
            t_muon.append(timed(muon, context))
        t_marsm.append(timed(marsm))
        phases.append(dict(marsm.last_step_stats.milliseconds))
        if not i % 2:
            t_muon.append(timed(muon, context))
    med_marsm, med_muon = statistics.median(t_marsm), statistics.median(t_muon)
    nearest = min(range(pairs), key=lambda j: abs(t_marsm[j] - med_marsm))
    row = {"threads": torch.get_num_threads(), "muon": "torch Muon, MARSM's NS" if emulated else "torch Muon",
           "marsm_ms": 1e3 * med_marsm, "muon_ms": 1e3 * med_muon, "ratio": med_marsm / med_muon,
           "pair_ratio_median": statistics.median(a / b for a, b in zip(t_marsm, t_muon, strict=True)),
           "marsm_all_ms": [1e3 * t for t in t_marsm], "muon_all_ms": [1e3 * t for t in t_muon],
           "marsm_phase_ms": phases[nearest]}
    if emulated:  # torch Muon as shipped: its scalar bf16 fallback, one step
        fresh_grads(ps, ps2, gen)
        row["shipped_muon_once_ms"] = 1e3 * timed(muon)
        row["ratio_to_shipped_muon"] = row["marsm_ms"] / row["shipped_muon_once_ms"]
    return row


def profile(d: int) -> None:
    """torch.profiler's top 15 ops by self CPU time of one MARSM step (after a warm-up step)."""
    marsm, _, ps, ps2, _ = build(d, swap_ns=False)
    gen = torch.Generator().manual_seed(2)
    fresh_grads(ps, ps2, gen)
    marsm.step()
    fresh_grads(ps, ps2, gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        marsm.step()
    print(f"\none MARSM step, {torch.get_num_threads()} thread(s), top 15 ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def print_table(rows: list[dict]) -> None:
    phases = list(rows[0]["marsm_phase_ms"])
    print(f"{'threads':>7} {'MARSM ms':>9} {'Muon ms':>9} {'MARSM/Muon':>10} {'pair med':>8}   "
          f"Muon   MARSM phases ms (step nearest its median): {' / '.join(phases)}")
    for r in rows:
        line = (f"{r['threads']:>7} {r['marsm_ms']:>9.1f} {r['muon_ms']:>9.1f} {r['ratio']:>9.3f}x "
                f"{r['pair_ratio_median']:>7.3f}x   {r['muon']}   "
                + " / ".join(f"{r['marsm_phase_ms'][p]:.1f}" for p in phases))
        if "shipped_muon_once_ms" in r:
            line += (f"\n{'':>7} torch Muon as shipped (scalar bf16 fallback), one step: "
                     f"{r['shipped_muon_once_ms']:.0f} ms; MARSM/it {r['ratio_to_shipped_muon']:.3f}x")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--dim", type=int, default=768, help="model width (768: GPT-2-small)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top 15 ops of one MARSM step")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--cpu-kinds", default="this", help=HELP)
    args = ap.parse_args()
    if args.cpu_kinds != "this":
        run_kinds(args.cpu_kinds, __file__)
        return
    emulated = emulates_bfloat16("cpu")
    threads = [int(t) for t in args.threads.split(",")]
    print(describe())
    print(f"8 float32 matrices {sorted(set(shapes(args.dim)))} x2, fresh torch.randn gradients each step; "
          f"torch {torch.__version__}; median of {args.pairs} interleaved pairs after {args.warmup} warm-up"
          + ("; bf16 emulated in float32: Muon gets MARSM's NS in the pairs" if emulated else ""))
    rows = [parity(t, args.dim, args.warmup, args.pairs, emulated) for t in threads]
    print_table(rows)
    if args.profile:
        torch.set_num_threads(threads[0])
        profile(args.dim)
    key = f"{cpu_kind()}-d{args.dim}"
    save_results(args.json, key, args, machine() | {"threads": threads}, rows)


if __name__ == "__main__":
    main()
