"""Peak extra memory per rank of one MARSM.step(): what the step allocates on top of parameters,
gradients and optimizer state, for GPT-2 small and Llama-3 8B shapes.

    python benchmarks/memory.py [--models gpt2-small,llama3-8b] [--layers N] [--worlds 1,8]
                                [--bucket-mib 256] [--ns-dtype bfloat16] [--device meta|cpu|cuda]
                                [--owner-policy balanced] [--json benchmarks/results/memory.json]

``--device meta`` (the default) needs no memory and runs in seconds: tensors have shapes but no
data. W=1 uses plain parameters; W>1 emulates FSDP2 in this one process as rank r of W (each rank
in turn, a fresh fake process group each): DTensor ``Shard(0)`` parameters whose local rows follow
``torch.chunk``, over torch's fake process group registered for the meta device only, so
collectives move nothing (and a CPU tensor handed to one fails, as it would with NCCL).
Host reads of meta tensors are answered with ones by :class:`marsm_dist.diagnostics.HostReads`;
:class:`~marsm_dist.diagnostics.PeakMemory` gives the peak bytes of the storages the step creates.
The table shows the rank with the largest peak. ``--device cpu`` measures real CPU tensors with
``PeakMemory`` (small models: it really runs Newton-Schulz); ``--device cuda`` reads
``torch.cuda.max_memory_allocated()`` around the step. Both are W=1 only. Every measured step is
the second one: the first builds the sharding plan, as in training.

bound = max(bucket_bytes, fp32 bytes of the largest matrix) (+ bucket_bytes at W>1 with pipelined
rounds, ``overlap=True``, the default: the next round's gather and the previous round's scatter
are in flight; ``--no-overlap`` measures without) + the Newton-Schulz temporaries of
the largest bucket: the peak that ``marsm_dist.orthogonalize.orthogonalize`` measures (with its
outputs) on fresh momenta of the matrices one rank owns in one bucket of
``make_plan(shapes, W, policy, bucket_bytes // 4)``, maximized over buckets and ranks (inputs:
float32 at W=1, as the step hands its momenta; NS dtype at W>1, as the exchange gathers them).
ratio = peak / bound. On meta and CUDA ``orthogonalize`` stacks same-shape matrices into one batch;
on the CPU it runs them one at a time, and on a CPU without bf16 matmul kernels bf16 Newton-Schulz
is emulated with float32 tensors (marsm_dist/newton_schulz.py), which changes the temporaries. That
emulation applies to device type ``cpu`` only, never on meta, so meta figures are those of a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_file import save_results  # noqa: E402
from benchmarks.shapes import MODELS, Shape, model_shapes  # noqa: E402
from marsm_dist import MARSM  # noqa: E402
from marsm_dist.diagnostics import HostReads, PeakMemory  # noqa: E402
from marsm_dist.newton_schulz import NS_COEFFICIENTS, emulates_bfloat16  # noqa: E402
from marsm_dist.orthogonalize import NSConfig, orthogonalize  # noqa: E402
from marsm_dist.sharding import make_plan  # noqa: E402
from marsm_dist.sharding.plan import plan_buckets  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "memory.json"
GiB = 2**30

@contextlib.contextmanager
def fake_world(world: int, rank: int) -> Iterator[DeviceMesh | None]:
    """This process as rank ``rank`` of ``world`` on a meta-only fake process group (None: W=1)."""
    if world == 1:
        yield None
        return
    dist.init_process_group("meta:fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield init_device_mesh("meta", (world,))
    finally:
        dist.destroy_process_group()


def _tensor(shape: Shape, device: str, scale: float = 1.0, dtype: torch.dtype = torch.float32):
    if device == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    return (torch.randn(shape, device=device) * scale).to(dtype)


def _shard(shape: Shape, mesh: DeviceMesh, rank: int) -> DTensor:
    """Rank ``rank``'s rows of a meta tensor of ``shape``, as FSDP2 holds them (torch.chunk)."""
    rows, world = shape[0], mesh.size()
    chunk = -(-rows // world)
    r0, r1 = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
    local = torch.empty((r1 - r0, *shape[1:]), device="meta")
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _param(shape: Shape, device: str, mesh: DeviceMesh | None, rank: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(_shard(shape, mesh, rank) if mesh is not None else _tensor(shape, device, 0.02))
    p.grad = _shard(shape, mesh, rank) if mesh is not None else _tensor(shape, device, 1e-3)
    return p


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (the local shards of DTensor state)."""
    tensors = [v.to_local() if isinstance(v, DTensor) else v
               for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def describe(err: BaseException) -> str:
    """The exception, with the innermost marsm_dist frame it passed through (where to fix it); the
    measuring modes of diagnostics.py sit under every torch call, so they would hide the caller."""
    tb = traceback.extract_tb(err.__traceback__)
    frames = [f"{f.filename.rsplit('/marsm_dist/', 1)[1]}:{f.lineno}" for f in tb
              if "/marsm_dist/" in f.filename and not f.filename.endswith("diagnostics.py")]
    where = f" at marsm_dist/{frames[-1]}" if frames else ""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}{where}: {first}"


def measure_rank(matrices: list[Shape], others: list[Shape], args, world: int, rank: int) -> dict:
    """Peak extra bytes of this rank's second step (the first builds the plan), or the error."""
    with fake_world(world, rank) as mesh:
        device = "meta" if mesh is not None else args.device
        torch.manual_seed(rank)
        try:
            groups = [{"params": [_param(s, device, mesh, rank) for s in matrices], "use_marsm": True},
                      {"params": [_param(s, device, mesh, rank) for s in others], "use_marsm": False}]
            with HostReads():
                opt = MARSM(groups, lr=1e-3, ns_dtype=args.ns_dtype, bucket_bytes=args.bucket_mib * 2**20,
                            owner_policy=args.owner_policy, overlap=not args.no_overlap)
                opt.init_state()
                opt.step()  # warm-up: builds the sharding plan, as the first step of training does
            if device == "cuda":
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                with HostReads() as reads:
                    opt.step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            else:
                with HostReads() as reads, PeakMemory() as mem:
                    opt.step()
                # On a CPU the elementwise temporaries live in memory kept from the first step
                # (marsm_dist.functional.Scratch): count it, as the step uses it.
                peak = mem.peak + opt._step_map.scratch.nbytes()
        except Exception as err:  # a failure in marsm_dist is a result of the row, not a crash
            return {"rank": rank, "error": describe(err)}
        return {"rank": rank, "peak_bytes": peak, "state_bytes": state_bytes(opt), "host_reads": reads.count}


def ns_bound(matrices: list[Shape], world: int, args) -> dict:
    """bucket_bytes (or the largest matrix in fp32) + the largest measured NS temporaries of one
    rank's share of one bucket; see the module doc."""
    bucket_bytes = args.bucket_mib * 2**20
    if world == 1:  # one process: the distributor batches its own matrices in index order
        owners = [0] * len(matrices)
        buckets = plan_buckets([math.prod(m) for m in matrices], owners, 1, max(1, bucket_bytes // 4))
    else:
        plan = make_plan(matrices, world, args.owner_policy, max(1, bucket_bytes // 4))
        owners, buckets = plan.owners, plan.buckets
    cfg = NSConfig(5, args.ns_dtype, NS_COEFFICIENTS)
    device = "cpu" if args.device == "cpu" else "meta"  # meta runs the GPU code path of orthogonalize
    in_dtype = torch.float32 if world == 1 else args.ns_dtype
    seen: dict[tuple[Shape, ...], int] = {}  # buckets repeat per layer: measure each kind once
    for bucket in buckets:
        for rank in range(world):
            owned = tuple(matrices[i] for i in bucket if owners[i] == rank)
            if owned and owned not in seen:
                inputs = [_tensor(s, device, dtype=in_dtype) for s in owned]  # made outside: not counted
                with PeakMemory() as mem:
                    out = orthogonalize(inputs, [cfg] * len(inputs))
                del out
                seen[owned] = mem.peak
    ns_peak = max(seen.values(), default=0)
    base = max(bucket_bytes, 4 * max((math.prod(s) for s in matrices), default=0))
    if world > 1 and not args.no_overlap:  # pipelined rounds: the next gather and the last scatter
        base += bucket_bytes
    return {"bound_bytes": base + ns_peak, "ns_temporaries_bytes": ns_peak, "buckets": len(buckets)}


def measure(name: str, args, world: int) -> dict:
    matrices, others = model_shapes(name, args.layers)
    row = {"model": name, "layers": MODELS[name][-1] if args.layers is None else args.layers, "world": world,
           "params": sum(math.prod(s) for s in matrices + others), "bucket_bytes": args.bucket_mib * 2**20,
           "ns_dtype": _dtype_name(args.ns_dtype), "device": args.device if world == 1 else "meta"}
    ranks = []
    for rank in range(world):
        ranks.append(measure_rank(matrices, others, args, world, rank))
        if "error" in ranks[-1]:  # every rank runs the same code: the first error says it
            row.update(rank=rank, error=ranks[-1]["error"])
            return row
    worst = max(ranks, key=lambda r: r["peak_bytes"])
    row.update(worst, per_rank_peak_bytes=[r["peak_bytes"] for r in ranks])
    row.update(ns_bound(matrices, world, args))
    row["ratio"] = row["peak_bytes"] / row["bound_bytes"]
    return row


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<11} {'layers':>6} {'W':>3} {'rank':>4} {'params':>7} {'state GiB':>9} "
          f"{'bucket MiB':>10} {'NS dtype':>8} {'peak GiB':>9} {'bound GiB':>9} {'ratio':>6}")
    for r in rows:
        head = (f"{r['model']:<11} {r['layers']:>6} {r['world']:>3} {r.get('rank', ''):>4} "
                f"{_count(r['params']):>7}")
        if "error" in r:
            print(f"{head} error: {r['error'][:160]}")
            continue
        print(f"{head} {r['state_bytes'] / GiB:>9.3f} {r['bucket_bytes'] / 2**20:>10.0f} {r['ns_dtype']:>8} "
              f"{r['peak_bytes'] / GiB:>9.3f} {r['bound_bytes'] / GiB:>9.3f} {r['ratio']:>6.2f}")


def machine(device: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": device,
            "bf16_emulated": device == "cpu" and emulates_bfloat16("cpu")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2-small,llama3-8b")
    ap.add_argument("--layers", type=int, default=None, help="cut every model to this many layers")
    ap.add_argument("--worlds", default="1,8", help="comma-separated world sizes (W>1: meta only)")
    ap.add_argument("--bucket-mib", type=int, default=256, help="MARSM's bucket_bytes, in MiB")
    ap.add_argument("--ns-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--owner-policy", default="balanced", choices=["balanced", "round_robin"])
    ap.add_argument("--device", default="meta", choices=["meta", "cpu", "cuda"])
    ap.add_argument("--no-overlap", action="store_true",
                    help="MARSM(overlap=False): exchange rounds one after another (W>1)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--key", default=None,
                    help="entry name in the JSON (default: DEVICE-NSDTYPE-BUCKETMiB[-LAYERSL])")
    args = ap.parse_args()
    args.ns_dtype = getattr(torch, args.ns_dtype)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    worlds = [int(w) for w in args.worlds.split(",") if w]
    if args.device != "meta" and any(w > 1 for w in worlds):
        skipped, worlds = [w for w in worlds if w > 1], [w for w in worlds if w == 1]
        print(f"--device {args.device}: W=1 only (W>1 is emulated on meta); skipping W={skipped}")
    print(f"MARSM step, peak extra memory per rank; device {args.device}, torch {torch.__version__}, "
          f"bf16 NS emulated in float32: {args.device == 'cpu' and emulates_bfloat16('cpu')}")
    rows = [measure(name, args, w) for name in args.models.split(",") if name for w in worlds]
    print_table(rows)
    key = args.key or (f"{args.device}-{_dtype_name(args.ns_dtype)}-{args.bucket_mib}MiB"
                       + (f"-{args.layers}L" if args.layers is not None else "")
                       + ("-serial" if args.no_overlap else ""))
    save_results(args.json, key, args, machine(args.device), rows)


if __name__ == "__main__":
    main()
