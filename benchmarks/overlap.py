"""Pipelined exchange rounds vs one after another: the sharding engine at W=2 on this CPU (gloo).

    python benchmarks/overlap.py [--shape 512x2048] [--matrices 16] [--repeats 5]
                                 [--ns-dtype bfloat16] [--json benchmarks/results/overlap.json]

Each rank holds row shards of ``--matrices`` equal matrices (FSDP2-like); the balanced plan gives
each owner one per round, so there are ``--matrices / 2`` rounds. The same engine orthogonalizes them with
``overlap=False`` (gather, Newton-Schulz, scatter per round, one after another) and with
``overlap=True`` (round k+1's gather and round k-1's scatter in flight while round k is
orthogonalized), alternately, ``--repeats`` times each. Reported per mode: the wall time of the
whole exchange (median over repeats, slowest rank), and, for the serial mode, its communication
and Newton-Schulz phases; the target is the pipelined time within 1.1x of
max(communication, Newton-Schulz) of the serial run. On a 2-core CPU the collectives' own copies
run on the same cores as Newton-Schulz (gloo's worker threads), so what hides here is the wait
for the peer, not the copy work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.optimizer_step import cpu_kind  # noqa: E402
from benchmarks.results_file import save_results  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "overlap.json"


def rank_run(rank: int, world: int, shape: tuple[int, int], count: int, repeats: int, dtype_name: str
             ) -> dict:
    import torch.distributed as dist

    from marsm_dist.newton_schulz import NS_COEFFICIENTS
    from marsm_dist.orthogonalize import NSConfig
    from marsm_dist.sharding import ShardingEngine, cut, row_chunks

    torch.set_num_threads(1)
    layouts = [row_chunks(shape, world) for _ in range(count)]
    gen = torch.Generator().manual_seed(0)
    local = [cut(lay, torch.randn(shape, generator=gen))[rank] for lay in layouts]
    configs = [NSConfig(5, getattr(torch, dtype_name), NS_COEFFICIENTS)] * count
    engines = {mode: ShardingEngine(layouts, dist.group.WORLD, "balanced", shape[0] * shape[1], overlap=mode)
               for mode in (False, True)}
    wall: dict[bool, list[float]] = {False: [], True: []}
    phases: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for rep in range(repeats + 1):
        for mode, engine in engines.items():
            engine.timer.reset()
            dist.barrier()
            t0 = time.perf_counter()
            engine.orthogonalize(local, configs)
            elapsed = time.perf_counter() - t0
            if rep:  # the first pass warms both up
                wall[mode].append(elapsed)
                phases[mode].append(engine.timer.milliseconds())
    plan = engines[True].plan
    return {"rounds": len(plan.buckets), "wall": wall, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512x2048")
    ap.add_argument("--matrices", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()
    from tests.helpers.distributed import run_distributed

    shape = tuple(int(x) for x in args.shape.split("x"))
    res = run_distributed(rank_run, 2, shape, args.matrices, args.repeats, args.ns_dtype,
                          timeout=1800)
    rows = {}
    for mode, name in ((False, "serial"), (True, "pipelined")):
        # Per repeat the slowest rank (a step ends when its last rank does), then the median.
        walls = [max(r["wall"][mode][k] for r in res) for k in range(args.repeats)]
        ms = {p: statistics.median(max(r["phases"][mode][k][p] for r in res) for k in range(args.repeats))
              for p in ("communication", "newton_schulz")}
        rows[name] = {"ms": 1e3 * statistics.median(walls), "phase_ms": ms,
                      "all_ms": [1e3 * w for w in walls]}
    serial = rows["serial"]
    bound = max(serial["phase_ms"]["communication"], serial["phase_ms"]["newton_schulz"])
    total = serial["phase_ms"]["communication"] + serial["phase_ms"]["newton_schulz"]
    rows["summary"] = {"max_comm_ns_ms": bound, "sum_comm_ns_ms": total,
                       "pipelined_vs_max": rows["pipelined"]["ms"] / bound,
                       "serial_vs_max": serial["ms"] / bound, "rounds": res[0]["rounds"]}
    print(f"CPU kind: {cpu_kind()}; W=2 gloo, {args.matrices} matrices {args.shape} (row shards), "
          f"{res[0]['rounds']} rounds, {args.ns_dtype} Newton-Schulz, 1 thread per rank; median of "
          f"{args.repeats}, slowest rank")
    print(f"{'mode':<10} {'exchange ms':>12} {'comm ms':>9} {'NS ms':>8} {'vs max(comm, NS)':>17}")
    for name in ("serial", "pipelined"):
        r = rows[name]
        print(f"{name:<10} {r['ms']:>12.1f} {r['phase_ms']['communication']:>9.1f} "
              f"{r['phase_ms']['newton_schulz']:>8.1f} {r['ms'] / bound:>16.2f}x")
    print("(the pipelined run's comm ms is the time it still waited on a collective)")
    save_results(args.json, f"{args.shape}-{args.matrices}m-{args.ns_dtype}-{cpu_kind()}",
                 args, {"cpu_kind": cpu_kind()}, rows)


if __name__ == "__main__":
    main()
