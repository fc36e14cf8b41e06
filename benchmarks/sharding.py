"""Sharding engine figures: bytes moved, Newton-Schulz load balance, and step time at W=1 vs W=2.

    python benchmarks/sharding.py [--json benchmarks/results/sharding.json] [--skip-processes]

Part 1 (plan only, no processes): GPT-2 small/medium matrix shapes at W = 8, 64, 512 under FSDP2
row sharding, both owner policies: Newton-Schulz FLOPs max/mean (and the lower bound that
whole-matrix ownership allows, ``ExchangePlan.lower_bound_flops`` / mean); the Newton-Schulz
critical path (sum over rounds of the busiest owner: a round is a rendezvous) over the busiest
rank's total, which is what the rounds cost; bytes per rank of our exchange vs
the analytic minimum and vs an all-gather design (every rank all-gathers every full matrix).
Every topology (plan only): the same figures for replicated data parallel (DDP), HSDP and
FSDP x TP beside 1-D FSDP, for GPT-2 small and Llama-3-8B shapes (benchmarks/topology_layouts.py).
Part 2 (real gloo processes on this CPU): MARSM optimizer step time on an FSDP2-sharded GPT at
W=2 vs the same model at W=1, and the bytes each rank moved, read from the optimizer's counters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marsm_dist.newton_schulz import newton_schulz_flops  # noqa: E402
from marsm_dist.sharding import make_plan, row_chunks  # noqa: E402

MODELS = {"gpt2-small": (768, 12), "gpt2-medium": (1024, 24)}


def gpt_matrices(d: int, layers: int) -> list[tuple[int, int]]:
    return [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers


def bytes_per_rank(shapes, owners, world_size, rank, itemsize=2):
    """(ours, minimum, all-gather) bytes received by ``rank`` in one step (sent is symmetric).

    Ours: gather my owned matrices' missing rows, then get my rows of the others' results back.
    Minimum: the same quantity, which no design that runs NS once per matrix can go below.
    All-gather: every rank receives every matrix's rows it does not hold."""
    ours = allgather = 0
    for shape, owner in zip(shapes, owners, strict=True):
        layout = row_chunks(shape, world_size)
        mine = layout.local_numel(rank)
        ours += (layout.numel - mine) if owner == rank else mine
        allgather += layout.numel - mine
    return ours * itemsize, ours * itemsize, allgather * itemsize


def plan_table() -> list[dict]:
    rows = []
    for name, (d, layers) in MODELS.items():
        shapes = gpt_matrices(d, layers)
        costs = [newton_schulz_flops(s) for s in shapes]
        for world in (8, 64, 512):
            for policy in ("round_robin", "balanced"):
                plan = make_plan(shapes, world, policy)
                bound = plan.lower_bound_flops / (sum(costs) / world)
                per_rank = [bytes_per_rank(shapes, plan.owners, world, r) for r in range(world)]
                ours = max(b[0] for b in per_rank)
                rows.append(dict(model=name, world=world, policy=policy, rounds=len(plan.buckets),
                                 flops_max_over_mean=plan.flops_balance, flops_lower_bound=bound,
                                 critical_path_vs_busiest=plan.critical_path_ratio,
                                 bytes_max_rank=ours, bytes_vs_minimum=ours / max(b[1] for b in per_rank),
                                 bytes_vs_allgather=ours / max(b[2] for b in per_rank)))
    return rows


def topology_table(worlds=(8, 64, 512), sample_ranks: int = 64) -> list[dict]:
    """Bytes per rank vs the minimum and NS FLOPs balance on every topology, for GPT-2 small and
    Llama-3-8B shapes (balanced owners; bytes over up to ``sample_ranks`` ranks spread evenly)."""
    from benchmarks.shapes import MODELS, model_shapes
    from benchmarks.topology_layouts import TOPOLOGIES, mesh_for, model_layouts, received_bytes

    rows = []
    for name in ("gpt2-small", "llama3-8b"):
        shapes, _ = model_shapes(name)
        costs = [newton_schulz_flops(s) for s in shapes]
        for world in worlds:
            plan = make_plan(shapes, world, "balanced")
            bound = plan.lower_bound_flops / (sum(costs) / world)
            ranks = sorted({r * world // sample_ranks for r in range(min(world, sample_ranks))})
            for topology in TOPOLOGIES:
                layouts = model_layouts(topology, MODELS[name][0], shapes, world)
                per_rank = [received_bytes(layouts, list(plan.owners), r) for r in ranks]
                ours = max(b[0] for b in per_rank)
                allgather = max(b[2] for b in per_rank)  # DDP: 0, it repeats NS on every rank instead
                rows.append(dict(model=name, world=world, topology=topology, mesh=mesh_for(topology, world),
                                 flops_max_over_mean=plan.flops_balance, flops_lower_bound=bound,
                                 rounds=len(plan.buckets), critical_path_vs_busiest=plan.critical_path_ratio,
                                 bytes_max_rank=ours, bytes_vs_minimum=ours / max(b[1] for b in per_rank),
                                 bytes_vs_allgather=ours / allgather if allgather else None))
    return rows


def step_time_run(rank, world_size, d, layers, steps, threads):
    from marsm_dist import MARSM, param_groups
    from tests.helpers import fsdp2_models as fm  # the FSDP2 tests' GPT and their way of sharding it

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = fm.shard(fm.GPT(d=d, layers=layers, heads=4, seq_len=64), world_size)
    opt = MARSM(param_groups(model), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    times, moved = [], []
    for step in range(steps + 3):
        x = torch.randint(0, 256, (8, 65), generator=gen)
        model(x[:, :-1], x[:, 1:]).backward()
        t0 = time.perf_counter()
        opt.step()
        if step >= 3:
            times.append(time.perf_counter() - t0)
            moved.append(opt.last_step_stats.bytes_sent + opt.last_step_stats.bytes_received)
        opt.zero_grad()
    return statistics.median(times), statistics.median(moved), opt.last_step_stats.milliseconds


def step_times(d: int, layers: int, steps: int) -> list[dict]:
    from tests.helpers.distributed import run_distributed

    shapes = gpt_matrices(d, layers)
    rows = []
    for world, threads in ((1, 2), (1, 1), (2, 1)):
        res = run_distributed(step_time_run, world, d, layers, steps, threads, timeout=900)
        owners = make_plan(shapes, world, "balanced").owners
        minimum = max(2 * bytes_per_rank(shapes, owners, world, r)[1] for r in range(world))
        moved = max(r[1] for r in res)
        rows.append(dict(world=world, threads_per_rank=threads, step_ms=1e3 * max(r[0] for r in res),
                         bytes_moved_per_rank=moved, bytes_vs_minimum=moved / minimum if minimum else 1.0,
                         phases_ms_rank0=res[0][2]))
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-processes", action="store_true", help="plan figures only")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    plan = plan_table()
    print("Plan only: NS FLOPs balance; MB each rank receives per step (= sends), bf16 on the wire")
    print("critical path: sum over rounds of the busiest owner's NS FLOPs / the busiest rank's total")
    print(f"{'model':<12} {'W':>4} {'policy':<12} {'NS max/mean':>11} {'lower bound':>11} {'rounds':>6} "
          f"{'crit. path':>10} {'MB max rank':>11} {'/minimum':>9} {'/all-gather':>11}")
    for r in plan:
        print(f"{r['model']:<12} {r['world']:>4} {r['policy']:<12} {r['flops_max_over_mean']:>11.3f} "
              f"{r['flops_lower_bound']:>11.3f} {r['rounds']:>6} {r['critical_path_vs_busiest']:>10.3f} "
              f"{r['bytes_max_rank'] / 2**20:>11.2f} "
              f"{r['bytes_vs_minimum']:>9.3f} {r['bytes_vs_allgather']:>11.3f}")
    result = {"plan": plan}
    topo = topology_table()
    result["topologies"] = topo
    print("\nEvery topology (balanced owners): MB the busiest rank receives per step, bf16 on the wire;")
    print("NS FLOPs max/mean beside the bound whole-matrix ownership allows")
    print(f"{'model':<11} {'W':>4} {'topology':<10} {'mesh':>8} {'NS max/mean':>11} {'bound':>7} "
          f"{'rounds':>6} {'crit. path':>10} {'MB max rank':>11} {'/minimum':>9} {'/all-gather':>11}")
    for r in topo:
        mesh = "x".join(map(str, r["mesh"]))
        print(f"{r['model']:<11} {r['world']:>4} {r['topology']:<10} {mesh:>8} "
              f"{r['flops_max_over_mean']:>11.3f} "
              f"{r['flops_lower_bound']:>7.3f} {r['rounds']:>6} {r['critical_path_vs_busiest']:>10.3f} "
              f"{r['bytes_max_rank'] / 2**20:>11.1f} "
              f"{r['bytes_vs_minimum']:>9.3f} {_ratio(r['bytes_vs_allgather']):>11}")
    if not args.skip_processes:
        steps = step_times(args.d_model, args.layers, args.steps)
        result["step_time"] = steps
        print(f"\nMARSM step on an FSDP2 GPT (d={args.d_model}, {args.layers} layers), gloo, this CPU")
        print(f"{'W':>2} {'threads/rank':>12} {'step ms':>9} {'vs W=1 (1 thr)':>15} {'MB moved/rank':>14} "
              f"{'/minimum':>9}")
        base = next(r["step_ms"] for r in steps if r["world"] == 1 and r["threads_per_rank"] == 1)
        for r in steps:
            print(f"{r['world']:>2} {r['threads_per_rank']:>12} {r['step_ms']:>9.1f} "
                  f"{r['step_ms'] / base:>15.2f} {r['bytes_moved_per_rank'] / 2**20:>14.2f} "
                  f"{r['bytes_vs_minimum']:>9.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
