"""Validation loss per token budget: a learning-rate sweep per optimizer on the demo model.

    python benchmarks/quality.py [--steps 200] [--seeds 2] [--jobs 1] [--rows adamw,muon,marsm,marsm-gamma0]
                                 [--rates adamw=2.5e-4,5e-4,1e-3 ...] [--max-extend 3]
                                 [--ns-dtype bfloat16] [--json out.json]

Each run is one demo run, started as its own process (``python -m marsm_dist.demo --world-size 1
--threads 1 --optimizers X --lr R --seed S --steps N``): the demo's byte-level GPT, corpus,
batches, schedule (10% warm-up, cosine to 10%) and weight decay, one rank, one thread. A seed
sets both the initial weights and the batch order, so the optimizers of one seed see the same
of each. The score is the demo's validation loss (held-out stdlib files) after the last step.

Rows:
  adamw          torch.optim.AdamW on everything
  muon           torch.optim.Muon on the hidden matrices + torch.optim.AdamW on the rest
  marsm          MARSM with its default gamma (variance reduction on)
  marsm-gamma0   MARSM with gamma=0: momentum on the plain gradient (what variance reduction buys)

Every row sweeps a log-spaced grid of peak learning rates (default: 6 rates, a factor of 2
apart) with ``--seeds`` seeds each; a rate's score is the mean over the seeds, and the best rate
is the one with the lowest mean (a run whose loss became NaN/inf counts as worse than any).
If the best rate sits at an end of the grid, the grid is extended by one more rate on that side,
up to ``--max-extend`` times per side, so the reported best is bracketed by worse rates.
The table gives every rate's per-seed and mean loss, then each row's best rate with its seed
spread (min..max and half the range), then MARS-M gamma=0 against the default, both at their
best rates and seed by seed at the same rate.

MARS-M's Newton-Schulz dtype is fixed by ``--ns-dtype`` (default bfloat16, MARSM's default and
what torch.optim.Muon uses) rather than the demo's timing-based ``auto``, whose choice could
change with the machine's load in the middle of a sweep.

The JSON (default benchmarks/results/quality.json) keeps one entry per step count, with the
machine (CPU model and whether bf16 matmuls are native or emulated), the command line and every
run's numbers (validation and final training loss, the training curve every 10 steps, times).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.results_file import save_results  # noqa: E402
from marsm_dist.newton_schulz import emulates_bfloat16  # noqa: E402

# row -> (demo optimizer, extra demo flags)
ROWS: dict[str, tuple[str, list[str]]] = {
    "adamw": ("adamw", []),
    "muon": ("muon", []),
    "marsm": ("marsm", []),
    "marsm-gamma0": ("marsm", ["--gamma", "0"]),
}
# A factor of 2 apart. An earlier 200-step sweep put AdamW's best at 1e-3 (lowest then tried)
# and MARS-M's and Muon's at 2e-2, so each grid brackets those.
DEFAULT_RATES: dict[str, list[float]] = {
    "adamw": [1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
    "muon": [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2],
    "marsm": [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2],
    "marsm-gamma0": [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2],
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "quality.json"
CURVE_EVERY = 10


@dataclass
class Run:
    """One demo run and what it reported (``val_loss`` is inf if the loss became NaN/inf)."""

    row: str
    lr: float
    seed: int
    val_loss: float = math.nan
    final_train_loss: float = math.nan
    diverged: bool = False
    curve: list[float] = field(default_factory=list)  # training loss every CURVE_EVERY steps
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    tokens_per_s: float = 0.0
    opt_step_ms: float = 0.0
    ns_dtype: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        for k in ("val_loss", "final_train_loss"):  # JSON has no inf
            d[k] = d[k] if math.isfinite(d[k]) else None
        return d


def demo_command(row: str, lr: float, seed: int, steps: int, ns_dtype: str, out_dir: Path) -> list[str]:
    """The demo's command line for one run (one rank, one torch thread)."""
    optimizer, extra = ROWS[row]
    stem = out_dir / f"{row}-{lr:g}-{seed}"
    return [sys.executable, "-m", "marsm_dist.demo", "--world-size", "1", "--threads", "1",
            "--optimizers", optimizer, "--lr", repr(lr), "--seed", str(seed), "--steps", str(steps),
            "--ns-dtype", ns_dtype, "--log-every", str(max(1, steps)), *extra,
            "--json", f"{stem}.json", "--png", f"{stem}.png"]


def run_one(run: Run, steps: int, ns_dtype: str, out_dir: Path) -> Run:
    """Start the demo for ``run`` and fill in its numbers; a diverged run is kept, marked."""
    cmd = demo_command(run.row, run.lr, run.seed, steps, ns_dtype, out_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    run.wall_seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        if "FloatingPointError" in proc.stderr:  # the demo stops a run whose loss is NaN/inf
            run.diverged, run.val_loss, run.final_train_loss = True, math.inf, math.inf
            return run
        raise RuntimeError(f"demo run failed (exit {proc.returncode}): {shlex.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads(Path(cmd[cmd.index("--json") + 1]).read_text())
    (result,) = summary["results"]
    run.val_loss = result["val_loss"]
    run.final_train_loss = result["final_train_loss"]
    if not math.isfinite(run.val_loss):
        run.diverged, run.val_loss = True, math.inf
    run.curve = result["losses"][CURVE_EVERY - 1::CURVE_EVERY]
    run.train_seconds = result["seconds"]
    run.tokens_per_s = result["tokens_per_s"]
    run.opt_step_ms = result["opt_step_ms"]
    run.ns_dtype = summary["config"]["ns_dtype"]
    return run


def by_rate(runs: list[Run], row: str) -> dict[float, list[Run]]:
    """``row``'s runs grouped by learning rate, rates ascending, runs by seed."""
    out: dict[float, list[Run]] = {}
    for r in sorted((r for r in runs if r.row == row), key=lambda r: (r.lr, r.seed)):
        out.setdefault(r.lr, []).append(r)
    return out


def mean_loss(runs: list[Run]) -> float:
    """The mean validation loss over seeds (inf if any seed diverged)."""
    return statistics.fmean(r.val_loss for r in runs) if all(math.isfinite(r.val_loss) for r in runs) \
        else math.inf


def best_rate(runs: list[Run], row: str) -> float:
    """The rate with the lowest mean validation loss (the smaller rate on a tie)."""
    grid = by_rate(runs, row)
    return min(grid, key=lambda lr: (mean_loss(grid[lr]), lr))


def summarize(runs: list[Run], row: str) -> dict[str, Any]:
    """``row``'s sweep: every rate's per-seed and mean loss, the best rate and its seed spread."""
    grid = by_rate(runs, row)
    best = best_rate(runs, row)
    losses = [r.val_loss for r in grid[best]]
    rates = sorted(grid)
    return {
        "row": row, "optimizer": ROWS[row][0], "demo_flags": ROWS[row][1],
        "rates": [{"lr": lr, "mean_val_loss": _finite(mean_loss(rs)),
                   "val_loss_per_seed": [_finite(r.val_loss) for r in rs],
                   "seeds": [r.seed for r in rs]} for lr, rs in grid.items()],
        "best_lr": best, "best_mean_val_loss": _finite(mean_loss(grid[best])),
        "best_min": _finite(min(losses)), "best_max": _finite(max(losses)),
        "best_half_range": _finite((max(losses) - min(losses)) / 2),
        "best_at_grid_edge": len(rates) > 1 and best in (rates[0], rates[-1]),
        "runs": [r.to_dict() for rs in grid.values() for r in rs],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def extensions(runs: list[Run], rows: list[str], seeds: list[int], extended: dict[str, list[int]],
               max_extend: int) -> list[Run]:
    """One more rate beyond each grid end where a row's best rate sits, if allowed."""
    new = []
    for row in rows:
        rates = sorted(by_rate(runs, row))
        if len(rates) < 2:
            continue
        best, factor = best_rate(runs, row), rates[1] / rates[0]
        for side, (edge, lr) in enumerate([(rates[0], rates[0] / factor), (rates[-1], rates[-1] * factor)]):
            if best == edge and extended[row][side] < max_extend:
                extended[row][side] += 1
                new += [Run(row, float(f"{lr:.4g}"), s) for s in seeds]
    return new


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def run_all(todo: list[Run], done: list[Run], args: argparse.Namespace, out_dir: Path, start: float,
            total: int) -> None:
    """Run ``todo`` (``--jobs`` at a time), appending to ``done``, with a progress line per run."""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, r, args.steps, args.ns_dtype, out_dir) for r in todo]
        for fut in as_completed(futures):
            r = fut.result()
            done.append(r)
            elapsed = time.perf_counter() - start
            left = elapsed / len(done) * (total - len(done))
            val = "diverged" if r.diverged else f"val {r.val_loss:.4f}"
            print(f"[quality] run {len(done)}/{total} {r.row} lr={r.lr:g} seed {r.seed}: {val} "
                  f"({r.wall_seconds:.1f} s; elapsed {_fmt_time(elapsed)}, ~{_fmt_time(left)} left)",
                  file=sys.stderr, flush=True)


def print_table(summaries: list[dict[str, Any]], seeds: list[int], steps: int, note: str) -> None:
    def loss(x: float | None) -> str:
        return f"{x:.4f}" if x is not None else "diverged"

    head = f"{'row':<13} {'peak lr':>8}  " + "  ".join(f"{'seed ' + str(s):>8}" for s in seeds) + \
        f"  {'mean':>8}"
    print(f"\nvalidation loss (nats per byte) after {steps} steps, per peak lr and seed")
    print(head)
    print("-" * len(head))
    for s in summaries:
        for rate in s["rates"]:
            mark = "  <- best" if rate["lr"] == s["best_lr"] else ""
            print(f"{s['row']:<13} {rate['lr']:>8.3g}  " +
                  "  ".join(f"{loss(x):>8}" for x in rate["val_loss_per_seed"]) +
                  f"  {loss(rate['mean_val_loss']):>8}{mark}")
        print()
    head = f"{'row':<13} {'best lr':>8} {'mean val':>9} {'seed min..max':>16} {'+-half range':>13}"
    print(f"best rate per row (mean over {len(seeds)} seed(s))")
    print(head)
    print("-" * len(head))
    for s in summaries:
        edge = "  (best at the grid's edge)" if s["best_at_grid_edge"] else ""
        print(f"{s['row']:<13} {s['best_lr']:>8.3g} {loss(s['best_mean_val_loss']):>9} "
              f"{loss(s['best_min']) + '..' + loss(s['best_max']):>16} "
              f"{loss(s['best_half_range']):>13}{edge}")
    if note:
        print("\n" + note)


def gamma_comparison(default: dict[str, Any], gamma0: dict[str, Any]) -> dict[str, Any]:
    """MARS-M gamma=0 against the default: at each row's best rate, and seed by seed (same
    initial weights and batches) at the default's best rate."""
    out: dict[str, Any] = {"default_best_lr": default["best_lr"], "gamma0_best_lr": gamma0["best_lr"]}
    a, b = default["best_mean_val_loss"], gamma0["best_mean_val_loss"]
    lines = ["MARS-M gamma=0 vs default gamma (what variance reduction buys here):"]
    if a is None or b is None:
        out["text"] = lines[0] + " a best rate diverged"
        return out
    out["best_vs_best"] = b - a
    lines.append(f"  at their best rates: default {a:.4f} (lr {default['best_lr']:g}, "
                 f"+-{default['best_half_range']:.4f}) vs gamma=0 {b:.4f} (lr {gamma0['best_lr']:g}, "
                 f"+-{gamma0['best_half_range']:.4f}): gamma=0 is {b - a:+.4f}")
    same = {r["lr"]: r for r in gamma0["rates"]}.get(default["best_lr"])
    here = {r["lr"]: r for r in default["rates"]}[default["best_lr"]]
    if same is not None and same["seeds"] == here["seeds"] and None not in same["val_loss_per_seed"]:
        diffs = [g - d for g, d in zip(same["val_loss_per_seed"], here["val_loss_per_seed"], strict=True)]
        out["paired_at_default_best_lr"] = diffs
        lines.append(f"  at lr {default['best_lr']:g}, seed by seed (gamma=0 minus default): " +
                     ", ".join(f"{d:+.4f}" for d in diffs))
    out["text"] = "\n".join(lines)
    return out


def cpu_model() -> str:
    """lscpu's model name, else what platform knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def parse_rates(specs: list[str]) -> dict[str, list[float]]:
    """``--rates row=lr,lr,...`` (repeatable) over the default grids."""
    rates = {k: list(v) for k, v in DEFAULT_RATES.items()}
    for spec in specs:
        row, _, values = spec.partition("=")
        if row not in ROWS or not values:
            raise SystemExit(f"--rates {spec!r}: expected ROW=LR,LR,... with ROW in {', '.join(ROWS)}")
        rates[row] = sorted(float(v) for v in values.split(",") if v)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default 200)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per rate (default 2)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    ap.add_argument("--rates", action="append", default=[], metavar="ROW=LR,LR,...",
                    help="a row's learning-rate grid (repeatable); defaults: " +
                    "; ".join(f"{k} {','.join(f'{x:g}' for x in v)}" for k, v in DEFAULT_RATES.items()))
    ap.add_argument("--max-extend", type=int, default=3,
                    help="rates added per grid end while the best sits there (default 3; 0: never)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="demo processes at a time, one thread each (default 1)")
    ap.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"],
                    help="MARS-M's Newton-Schulz dtype (default bfloat16; auto: the demo's timing)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--key", default=None, help="entry name in the JSON (default: demo-STEPSsteps)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    if args.seeds < 1 or args.jobs < 1 or args.steps < 1:
        raise SystemExit("--seeds, --jobs and --steps must be >= 1")
    grids = parse_rates(args.rates)
    seeds = list(range(args.seeds))
    emulated = emulates_bfloat16("cpu")
    machine = {"cpu": cpu_model(), "cpu_kind": "AVX2 emulation" if emulated else "native bf16",
               "bf16_emulated": emulated, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch": torch.__version__, "python": platform.python_version(),
               "threads_per_run": 1, "jobs": args.jobs}
    args.command_line = shlex.join([sys.executable, *sys.argv])
    key = args.key or f"demo-{args.steps}steps"
    print(f"quality sweep: {', '.join(rows)}; {args.steps} steps, seeds {seeds}, {args.jobs} job(s); "
          f"CPU {machine['cpu']} ({machine['cpu_kind']}); MARS-M Newton-Schulz in {args.ns_dtype}",
          file=sys.stderr, flush=True)
    todo = [Run(row, lr, s) for row in rows for lr in grids[row] for s in seeds]
    done: list[Run] = []
    extended = {row: [0, 0] for row in rows}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="marsm-quality-") as tmp:
        while todo:
            run_all(todo, done, args, Path(tmp), start, len(done) + len(todo))
            todo = extensions(done, rows, seeds, extended, args.max_extend)
    args.wall_seconds = round(time.perf_counter() - start, 1)
    summaries = [summarize(done, row) for row in rows]
    named = {s["row"]: s for s in summaries}
    note = ""
    if "marsm" in named and "marsm-gamma0" in named:
        cmp = gamma_comparison(named["marsm"], named["marsm-gamma0"])
        note = cmp.pop("text")
        named["marsm-gamma0"]["vs_default"] = cmp
    print_table(summaries, seeds, args.steps, note)
    print(f"\n{len(done)} runs in {_fmt_time(args.wall_seconds)}")
    save_results(args.json, key, args, machine, summaries)


if __name__ == "__main__":
    main()
