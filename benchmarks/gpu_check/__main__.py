"""``python -m benchmarks.gpu_check [--dry] [--json PATH] [--only a,b] [--frameworks]``.

Runs every section (see the package doc), each in its own try/except, prints timestamped progress,
writes one JSON and ends with a summary table. Exit code 0 if no section failed, 1 if one did,
2 if the run cannot start (GPU mode without CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.results_file import git_commit

from . import compute, external, optim, shared_gpu
from .core import ROOT, Ctx, log, record

SECTIONS: dict[str, Callable[[Ctx], dict]] = {
    "env": compute.env,
    "matmul": compute.matmul,
    "newton_schulz": compute.newton_schulz,
    "correctness": optim.correctness,
    "host_syncs": optim.host_syncs,
    "step_time": optim.step_time,
    "memory": external.memory,
    "distributed": external.distributed,
    "shared_gpu": shared_gpu.section,
}
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true",
                    help="CPU, tiny sizes, gloo: checks that the whole check runs (seconds to a minute)")
    ap.add_argument("--json", type=Path, default=None,
                    help="output (default benchmarks/results/gpu_check.json; gpu_check_dry.json with --dry)")
    ap.add_argument("--only", default="", help=f"comma-separated sections, from {', '.join(SECTIONS)}")
    ap.add_argument("--frameworks", action="store_true",
                    help="with --dry: also run the DeepSpeed and Megatron checks on the CPU (slow)")
    ap.add_argument("--llama-layers", type=int, default=8,
                    help="Llama-3-8B layers in the Newton-Schulz section (default 8 of 32: same batches, "
                    "a quarter of the memory and time)")
    return ap.parse_args(argv)


def table(sections: dict[str, dict]) -> str:
    """The closing summary: one line per section."""
    lines = [f"{'section':<14} {'status':<8} {'s':>6}  result", "-" * 100]
    for name, rec in sections.items():
        text = rec.get("summary") or rec.get("reason") or rec.get("error", "")
        text = " ".join(str(text).split())
        lines.append(f"{name:<14} {rec['status']:<8} {rec.get('seconds', 0):>6.1f}  {text[:150]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write the JSON, print the table; the exit code."""
    args = parse_args(argv)
    names = [s for s in args.only.split(",") if s] or list(SECTIONS)
    if unknown := [s for s in names if s not in SECTIONS]:
        print(f"gpu_check: unknown sections {unknown}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --dry for the CPU dry run", file=sys.stderr)
        return 2
    path = args.json or RESULTS / ("gpu_check_dry.json" if args.dry else "gpu_check.json")
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log(f"gpu_check ({'dry, CPU' if args.dry else 'GPU'}): sections {', '.join(names)} -> {path}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Ctx(dry=args.dry, device=device, tmp=Path(tmp), frameworks=args.frameworks,
                  llama_layers=args.llama_layers)
        for name in names:
            log(f"{name}: start")
            ctx.found[name] = record(lambda fn=SECTIONS[name]: fn(ctx))
            rec = ctx.found[name]
            log(f"{name}: {rec['status']} in {rec['seconds']:.1f} s"
                + (f" -- {rec.get('error') or rec.get('reason')}" if rec["status"] != "ok" else ""))
            _write(path, args, started, ctx.found)  # after every section: a crash keeps what ran
    failed = [n for n, r in ctx.found.items() if r["status"] == "failed"]
    print("\n" + table(ctx.found), flush=True)
    verdict = f"FAILED: {', '.join(failed)}" if failed else "no section failed"
    print(f"\nwrote {path}; {verdict}", flush=True)
    return 1 if failed else 0


def _write(path: Path, args: argparse.Namespace, started: str, sections: dict[str, dict]) -> None:
    failed = [n for n, r in sections.items() if r["status"] == "failed"]
    doc = {"mode": "dry" if args.dry else "gpu", "started": started, "commit": git_commit(),
           "argv": sys.argv[1:], "ok": not failed, "failed": failed, "sections": sections}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
