"""Scale model of the MARS-M optimizer step at 8 to 1024 GPUs: plan only, no processes.

    python benchmarks/scale_model.py [--json benchmarks/results/scale_model.json] [--tflops 989]
        [--ns-efficiency 0.6] [--hbm-gbs 3350] [--nvlink-gbs 450] [--internode-gbs 50]
        [--gpus-per-node 8] [--sample-ranks 64] [--models NAME ...] [--moe-layers N]
        [--moe-bucket-numel 67108864] [--launch-us 5]

Llama-3-8B and Llama-3-70B shapes (benchmarks/shapes.py) at W = 8, 64, 512, 1024 under FSDP,
HSDP and DDP (piece layouts of benchmarks/topology_layouts.py; ranks r are grouped into nodes of
``--gpus-per-node`` consecutive ranks), balanced owner plan (``make_plan(shapes, W, "balanced")``,
default bucket). Per row:

- bytes the busiest rank receives per step, bf16 on the wire, by the exchange's rules
  (``received_bytes``' "ours"), split by where each byte comes from: an owner receives each other
  rank's pieces of its matrices within the owner's copy; a non-owner in the owner's copy receives
  its piece from the owner; a rank of another copy (HSDP / DDP replicas) receives its piece from
  the rank holding the same piece in the owner's copy (the broadcast over the replica group).
  Intra-node bytes go at ``--nvlink-gbs``, inter-node bytes at ``--internode-gbs``, one after the
  other. Assumed: sends are symmetric to receives (so the receive side is the bottleneck),
  the links are not shared with other traffic (e.g. the gradient reduce-scatter), latency is
  nothing, and a broadcast is as fast as its slowest hop (an owner in another node means
  inter-node bytes for every receiver, as a ring broadcast across nodes runs at the NIC's rate).
- Newton-Schulz (NS): the critical path (``ExchangePlan.critical_path_flops``: per round, the
  busiest owner) at ``--tflops`` x ``--ns-efficiency`` (the efficiency is an ASSUMPTION: the
  fraction of the bf16 dense peak that NS's matmuls reach); the ideal if NS were spread perfectly
  (total FLOPs / W); the idle share 1 - ideal / critical path, and what it costs in the step.
- elementwise: MARS-M on this rank's local matrix elements (reads p, g, m, g_prev and writes p,
  m, g_prev, fp32: 28 B per element) plus AdamW on its share of the other parameters (embedding,
  head, norms; reads p, g, m, v and writes p, m, v, fp32: 28 B per element), at ``--hbm-gbs``.
  FSDP / HSDP shard the other parameters like the matrices (rows over the shard group), DDP
  holds them whole. The bf16 copies NS reads and writes and the gradient clip are not counted.
- MARS-M step = elementwise + max(comm, NS critical path) (rounds pipelined: one bucket's
  exchange under another's NS); serial = elementwise + comm + NS critical path. Each term is the
  maximum over ranks, so the sum is an upper bound when different ranks are the slowest.
- AdamW's step: AdamW on this rank's share of the whole model (DDP: the whole model), elementwise
  only (no optimizer communication).
- all-gather design: every rank all-gathers every full matrix within its copy (bytes full - local,
  split the same way; DDP: nothing moves) and runs every matrix's NS itself (total FLOPs on one
  GPU), no scatter; its step = elementwise + max(all-gather, NS of every matrix).

Second table, what splitting one matrix's NS over k ranks would save where whole-matrix ownership
leaves ranks idle: the largest matrix, in its wide orientation m x n (m <= n), split over k = 2,
4, 8 ranks of one node by column blocks: per member per iteration 2 m^2 n / k + m^3 multiply-adds
(X_j X_j^T, the m x m polynomial done by every member, B X_j) plus one ring all-reduce of the
m x m Gram matrix over NVLink (bf16: 2 (k - 1) / k x 2 m^2 bytes), 5 iterations. The estimate:
bound with splitting, simple = max(total / W, max over matrices of min over k <= 8 of the member
time); capacity = the same but counting the rank-time a split costs (k members, each repeating the
m^3 product and the all-reduce), see :func:`split_bound`. Both assume the rest packs perfectly and
that a split matrix's gather and scatter cost what they cost whole; the critical path with
splitting is the bound plus what the rounds cost now (critical path -
``ExchangePlan.lower_bound_flops``), which splitting does not remove. Savings use the capacity one.

Third table, mixture of experts (``MOE_MODELS`` of benchmarks/shapes.py: a DeepSeek-V3-like and a
Qwen3-30B-A3B-like model, see there for the shapes and what was simplified) at EP = 8, 16, 32, 64 and
W = 64, 256, 1024 (W a multiple of EP). Rank r = edp * EP + c: an EP group is EP consecutive ranks,
and the experts of EP coordinate c (E / EP consecutive ones per layer) are held WHOLE by the W / EP
ranks r = c mod EP, one copy per EP group (:func:`expert_layout`); the dense matrices (attention,
shared expert, dense layers) are FSDP rows over all W ranks. The plan is the engine's:
``make_plan(shapes, W, "balanced", --moe-bucket-numel, candidates=[layout.preferred_owners ...])``,
so an expert's owner is one of its holders and nothing is gathered for it (a dense matrix with at
most W / 2 rows, Qwen's k and v at W = 1024, gets its row holders as candidates). Per row:

- NS critical path (``ExchangePlan.critical_path_flops``) against the lower bound
  (:func:`candidate_bound`): max(lower_bound(all matrices, W), and for every candidate set S,
  lower_bound(the matrices whose candidates lie in S, |S|)): total / W, the largest matrix, and
  per EP coordinate its experts' cost / (W / EP) (they cannot leave those ranks). It ignores the
  rounds and the bucket's memory cap (an owner takes at most ``--moe-bucket-numel`` elements per
  round, so in a round where another owner runs a large dense matrix, an owner of experts only
  runs a few of them; for DeepSeek's sizes at W >= 256 that alone costs more than 5%). Target:
  crit / bound <= 1.05; busiest / bound separates the owners' balance from what the rounds add.
- bytes the busiest rank receives (sampled as in the first table; ours, which for these layouts
  equals ``received_bytes``' minimum for the same owners) against the floor no owner choice goes
  under (:func:`moe_bytes_floor`): per rank on average, each expert's result broadcast to its
  other W / EP - 1 copies and each dense matrix's gather plus scatter; the bytes gathered for
  experts (0 when every expert's owner holds it) and how many experts' owners do not hold them.
- the alternative to the broadcast: every copy orthogonalizes the experts it holds itself (no
  expert bytes; the NS FLOPs of one rank's experts, the same on every rank: "self").
- Newton-Schulz calls per step of the busiest owner: batched (``orthogonalize`` on a GPU: one call
  per round per distinct shape up to a transpose) and unbatched (one per matrix); x 5 iterations
  x 3 matmuls is the kernel launches. The critical path again with ``--launch-us`` per matmul
  launch added to every owner's round (an ASSUMED per-launch cost; the normalization and the
  polynomial's elementwise kernels are not counted): what an owner of hundreds of small experts
  would pay if it ran them one by one.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections import Counter
from functools import cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import save_results  # noqa: E402
from benchmarks.shapes import MODELS, model_shapes, moe_shapes  # noqa: E402
from benchmarks.topology_layouts import layout as topology_layout  # noqa: E402
from benchmarks.topology_layouts import mesh_for, model_layouts, received_bytes  # noqa: E402
from marsm_dist.newton_schulz import newton_schulz_flops  # noqa: E402
from marsm_dist.sharding import ExchangePlan, make_plan  # noqa: E402
from marsm_dist.sharding.layout import MatrixLayout, Piece  # noqa: E402
from marsm_dist.sharding.plan import lower_bound  # noqa: E402

SCALE_MODELS = ("llama3-8b", "llama3-70b")
WORLDS = (8, 64, 512, 1024)
SCALE_TOPOLOGIES = ("fsdp", "hsdp", "ddp")
NS_STEPS = 5
WIRE_ITEMSIZE = 2  # bf16 on the wire
MARSM_BYTES_PER_ELEM = 28  # fp32: reads p, g, m, g_prev; writes p, m, g_prev
ADAMW_BYTES_PER_ELEM = 28  # fp32: reads p, g, m, v; writes p, m, v
SPLIT_KS = (1, 2, 4, 8)
MIB = 2**20
MOE_RUN = ("deepseek-v3-like", "qwen3-30b-a3b-like")
MOE_EPS = (8, 16, 32, 64)
MOE_WORLDS = (64, 256, 1024)
MOE_TARGET = 1.05  # NS critical path / lower bound
MATMULS_PER_STEP = 3  # per Newton-Schulz iteration: X X^T, the polynomial's square, B X


# --- bytes by source ------------------------------------------------------------------------------

_CACHE: dict[tuple[int, int], tuple[MatrixLayout, dict[int, list[int]], dict[int, dict[int, int]]]] = {}


def _copies(lay: MatrixLayout, gpus_per_node: int) -> tuple[dict[int, list[int]], dict[int, dict[int, int]]]:
    """(copy -> its ranks, copy -> node -> elements that copy's ranks in that node hold), cached
    per layout (the layouts themselves are cached, so the same object comes back)."""
    key = (id(lay), gpus_per_node)
    hit = _CACHE.get(key)
    if hit is None or hit[0] is not lay:
        ranks: dict[int, list[int]] = {}
        per_node: dict[int, dict[int, int]] = {}
        for r in range(lay.world_size):
            c = lay.replica_of(r)
            ranks.setdefault(c, []).append(r)
            node = per_node.setdefault(c, {})
            node[r // gpus_per_node] = node.get(r // gpus_per_node, 0) + lay.local_numel(r)
        hit = _CACHE[key] = (lay, ranks, per_node)
    return hit[1], hit[2]


def _overlap(a: tuple[Piece, ...], b: tuple[Piece, ...]) -> int:
    return sum(max(0, min(p.stop, q.stop) - max(p.start, q.start))
               for p in a for q in b if p.block == q.block)


def received_split(layouts: list[MatrixLayout], owners: list[int], rank: int, gpus_per_node: int = 8,
                   itemsize: int = WIRE_ITEMSIZE) -> tuple[int, int]:
    """(intra-node, inter-node) bytes ``rank`` receives in one step by the exchange's rules; their
    sum is ``received_bytes(...)[0]``. By source: an owner gets each other rank's pieces of its
    matrices within its copy; a non-owner of the owner's copy gets its pieces from the owner; a
    rank of another copy gets its pieces from the ranks of the owner's copy that hold them."""
    node = rank // gpus_per_node
    intra = inter = 0
    for lay, owner in zip(layouts, owners, strict=True):
        ranks, per_node = _copies(lay, gpus_per_node)
        owner_copy = lay.replica_of(owner)
        if owner == rank:
            sums = per_node[owner_copy]
            near = sums.get(node, 0) - lay.local_numel(rank)
            intra += near
            inter += sum(sums.values()) - lay.local_numel(rank) - near
        elif lay.replica_of(rank) == owner_copy:
            mine = lay.local_numel(rank)
            if owner // gpus_per_node == node:
                intra += mine
            else:
                inter += mine
        else:
            mine = lay.pieces[rank]
            if not mine:
                continue
            got = 0
            for src in ranks[owner_copy]:
                n = _overlap(mine, lay.pieces[src])
                if n and src // gpus_per_node == node:
                    intra += n
                else:
                    inter += n
                got += n
            if got != lay.local_numel(rank):
                raise ValueError(f"rank {rank}'s pieces of {lay.shape} are not covered by the owner's copy")
    return intra * itemsize, inter * itemsize


def allgather_split(layouts: list[MatrixLayout], rank: int, gpus_per_node: int = 8,
                    itemsize: int = WIRE_ITEMSIZE) -> tuple[int, int]:
    """(intra-node, inter-node) bytes ``rank`` receives when it all-gathers every full matrix
    within its copy (each other rank of the copy sends its pieces); the sum is
    ``received_bytes(...)[2]``."""
    node = rank // gpus_per_node
    intra = inter = 0
    for lay in layouts:
        _, per_node = _copies(lay, gpus_per_node)
        sums = per_node[lay.replica_of(rank)]
        mine = lay.local_numel(rank)
        near = sums.get(node, 0) - mine
        intra += near
        inter += sum(sums.values()) - mine - near
    return intra * itemsize, inter * itemsize


# --- times ----------------------------------------------------------------------------------------

def flop_rate(args: argparse.Namespace) -> float:
    """FLOP/s that Newton-Schulz's matmuls reach (peak x the assumed efficiency)."""
    return args.tflops * 1e12 * args.ns_efficiency


def comm_seconds(intra: int, inter: int, args: argparse.Namespace) -> float:
    return intra / (args.nvlink_gbs * 1e9) + inter / (args.internode_gbs * 1e9)


def ns_seconds(flops: float, args: argparse.Namespace) -> float:
    return flops / flop_rate(args)


def split_member_seconds(shape: tuple[int, int], k: int, args: argparse.Namespace,
                         steps: int = NS_STEPS) -> float:
    """One member's time when ``shape``'s NS (plain form) is split over ``k`` ranks of one node by
    column blocks of its wide orientation: per iteration 2 m^2 n / k + m^3 multiply-adds and a
    ring all-reduce of the m x m Gram matrix (bf16) over NVLink. k = 1 is the whole matrix."""
    m, n = min(shape), max(shape)
    macs = 2 * m * m * n / k + m**3
    allreduce = 2 * (k - 1) / k * WIRE_ITEMSIZE * m * m
    return steps * (2 * macs / flop_rate(args) + allreduce / (args.nvlink_gbs * 1e9))


def _local_rows(rows: int, parts: int, k: int) -> int:
    """Rows part ``k`` of ``parts`` holds when cut as torch.chunk does."""
    size = -(-rows // parts)
    return max(0, min(rows, (k + 1) * size) - min(rows, k * size))


def other_local_numel(shape: tuple[int, ...], topology: str, world: int, rank: int) -> int:
    """Elements of a non-matrix parameter (embedding, head, norm) ``rank`` holds: rows over the
    shard group (FSDP: all W ranks; HSDP: the ranks of one replica), whole under DDP."""
    if topology == "ddp":
        return math.prod(shape)
    _, inner = mesh_for(topology, world)
    parts, k = (world, rank) if topology == "fsdp" else (inner, rank % inner)
    return _local_rows(shape[0], parts, k) * math.prod(shape[1:])


def sample_ranks(world: int, owners: list[int], numels: list[int], count: int, gpus_per_node: int
                 ) -> list[int]:
    """Up to ``count`` ranks spread over the job (local index varied, so not every sample is a
    node's first GPU), plus the 4 ranks that own the most elements and the 4 that own the least
    (the busiest receivers: owners gather whole matrices; under DDP non-owners receive every result).
    ``count`` <= 0 or >= W: every rank."""
    if count <= 0 or count >= world:
        return list(range(world))
    step = world // count
    spread = {r * step + (r % min(gpus_per_node, step)) for r in range(count)}
    owned = [0] * world
    for owner, n in zip(owners, numels, strict=True):
        owned[owner] += n
    by_owned = sorted(range(world), key=lambda r: (owned[r], r))
    return sorted(spread | set(by_owned[:4]) | set(by_owned[-4:]))


# --- tables ---------------------------------------------------------------------------------------

def scale_rows(args: argparse.Namespace, models=SCALE_MODELS, worlds=WORLDS, topologies=SCALE_TOPOLOGIES
               ) -> list[dict]:
    """One row per (model, W, topology): see the module docstring."""
    g = args.gpus_per_node
    rows = []
    for name in models:
        shapes, others = model_shapes(name)
        numels = [math.prod(s) for s in shapes]
        for world in worlds:
            plan = make_plan(shapes, world, "balanced", ns_steps=NS_STEPS)
            owners = list(plan.owners)
            total_flops = sum(plan.costs)
            crit_s = ns_seconds(plan.critical_path_flops, args)
            ideal_s = ns_seconds(total_flops / world, args)
            bound_s = ns_seconds(plan.lower_bound_flops, args)
            ns_all_s = ns_seconds(total_flops, args)
            ranks = sample_ranks(world, owners, numels, args.sample_ranks, g)
            for topology in topologies:
                layouts = model_layouts(topology, MODELS[name][0], shapes, world)
                best = dict(bytes=-1, comm=-1.0, ag_bytes=-1, ag=-1.0, elem=-1.0, adamw=-1.0)
                for r in ranks:
                    intra, inter = received_split(layouts, owners, r, g)
                    comm = comm_seconds(intra, inter, args)
                    if intra + inter > best["bytes"]:
                        best.update(bytes=intra + inter)
                    if comm > best["comm"]:
                        best.update(comm=comm, comm_intra=intra, comm_inter=inter, comm_rank=r)
                    ag_intra, ag_inter = allgather_split(layouts, r, g)
                    best["ag_bytes"] = max(best["ag_bytes"], ag_intra + ag_inter)
                    ag = comm_seconds(ag_intra, ag_inter, args)
                    if ag > best["ag"]:
                        best.update(ag=ag, ag_intra=ag_intra, ag_inter=ag_inter)
                    mat = sum(lay.local_numel(r) for lay in layouts)
                    oth = sum(other_local_numel(s, topology, world, r) for s in others)
                    hbm = args.hbm_gbs * 1e9
                    elem = (mat * MARSM_BYTES_PER_ELEM + oth * ADAMW_BYTES_PER_ELEM) / hbm
                    best["elem"] = max(best["elem"], elem)
                    best["adamw"] = max(best["adamw"], (mat + oth) * ADAMW_BYTES_PER_ELEM / hbm)
                step = best["elem"] + max(best["comm"], crit_s)
                step_ideal = best["elem"] + max(best["comm"], ideal_s)
                ag_step = best["elem"] + max(best["ag"], ns_all_s)
                rows.append(dict(
                    model=name, world=world, topology=topology, mesh=mesh_for(topology, world),
                    ranks_evaluated=len(ranks), rounds=len(plan.buckets),
                    bytes_max_rank=best["bytes"], comm_rank=best["comm_rank"],
                    comm_intra_bytes=best["comm_intra"], comm_inter_bytes=best["comm_inter"],
                    comm_ms=1e3 * best["comm"], ns_crit_flops=plan.critical_path_flops,
                    ns_crit_ms=1e3 * crit_s, ns_ideal_ms=1e3 * ideal_s, ns_bound_ms=1e3 * bound_s,
                    idle_share=1 - ideal_s / crit_s, ns_idle_ms=1e3 * (crit_s - ideal_s),
                    step_idle_ms=1e3 * (step - step_ideal), step_idle_share=(step - step_ideal) / step,
                    elementwise_ms=1e3 * best["elem"], marsm_step_ms=1e3 * step,
                    marsm_step_serial_ms=1e3 * (best["elem"] + best["comm"] + crit_s),
                    adamw_step_ms=1e3 * best["adamw"], allgather_bytes_max_rank=best["ag_bytes"],
                    allgather_intra_bytes=best["ag_intra"], allgather_inter_bytes=best["ag_inter"],
                    allgather_comm_ms=1e3 * best["ag"], allgather_ns_ms=1e3 * ns_all_s,
                    allgather_step_ms=1e3 * ag_step))
    return rows


def split_bound(shapes: list[tuple[int, int]], world: int, args: argparse.Namespace
                ) -> tuple[float, float, dict[tuple[int, int], int]]:
    """(simple, capacity) estimates of the busiest rank's NS seconds when matrices may be split
    over k in (1, 2, 4, 8) ranks of one node, and the split per shape of the capacity estimate.

    Simple (the issue's): max(total / W, max over matrices of min over k of the member time): it
    assumes the ranks are there. Capacity: a split costs rank-time (k members, each repeating the
    m^3 product and waiting on the all-reduce), so for a target T every matrix takes the smallest
    k whose member time is <= T, and the estimate is max(T, that rank-time summed / W), the best T
    over every member time and the ideal. Neither counts the packing of whole pieces into ranks."""
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    member = {(shape, k): split_member_seconds(shape, k, args) for shape in counts for k in SPLIT_KS}
    ideal = sum(n * member[shape, 1] for shape, n in counts.items()) / world
    simple = max(ideal, max(min(member[shape, k] for k in SPLIT_KS) for shape in counts))
    best = (math.inf, {})
    for target in sorted({ideal, *member.values()}):
        ks = {}
        for shape in counts:
            k = next((k for k in SPLIT_KS if member[shape, k] <= target * (1 + 1e-12)), None)
            if k is None:
                break
            ks[shape] = k
        else:
            work = sum(n * ks[shape] * member[shape, ks[shape]] for shape, n in counts.items())
            estimate = max(target, work / world)
            if estimate < best[0]:
                best = (estimate, ks)
    return simple, best[0], best[1]


def team_plan_seconds(shapes: list[tuple[int, int]], world: int, args: argparse.Namespace
                      ) -> tuple[float, int]:
    """The NS critical path of the plan MARSM runs with ``ns_team_max`` = GPUs per node
    (``make_plan(..., max_team=...)``, :mod:`marsm_dist.sharding.teams`), plus its busiest team's
    own traffic over NVLink: the owner's broadcast of the full matrix and the gather of the
    columns (bf16, each (k - 1)/k of the matrix through the owner's link) and one ring all-reduce
    of the m x m Gram matrix per iteration (fp32, as ``split_newton_schulz`` sums it). Returns the
    seconds and the largest team."""
    plan = make_plan(shapes, world, "balanced", ns_steps=NS_STEPS, max_team=args.gpus_per_node)
    traffic = 0.0
    for i, team in enumerate(plan.teams):
        if len(team) > 1:
            k, (m, n) = len(team), sorted(shapes[i])
            moved = 2 * (k - 1) / k * WIRE_ITEMSIZE * m * n + NS_STEPS * 2 * (k - 1) / k * 4 * m * m
            traffic = max(traffic, moved / (args.nvlink_gbs * 1e9))
    return ns_seconds(plan.critical_path_flops, args) + traffic, max((len(t) for t in plan.teams), default=1)


def split_rows(args: argparse.Namespace, scale: list[dict], models=SCALE_MODELS, worlds=WORLDS
               ) -> list[dict]:
    """Per (model, W): the NS critical path if the matrices that exceed the ideal per-rank load
    were split over k <= 8 ranks of one node (:func:`split_bound`; what the rounds cost now,
    critical path - lower bound, is kept), and what the pipelined step would save."""
    rows = []
    for name in models:
        shapes, _ = model_shapes(name)
        costs = [newton_schulz_flops(s, NS_STEPS) for s in shapes]
        for world in worlds:
            plan = make_plan(shapes, world, "balanced", ns_steps=NS_STEPS)
            crit_s = ns_seconds(plan.critical_path_flops, args)
            ideal_s = ns_seconds(sum(costs) / world, args)
            bound_s = ns_seconds(plan.lower_bound_flops, args)
            rounds_s = crit_s - bound_s  # what the rounds cost; splitting keeps it
            big = max(range(len(shapes)), key=lambda i: costs[i])
            member = {k: split_member_seconds(shapes[big], k, args) for k in SPLIT_KS}
            simple_s, capacity_s, ks = split_bound(shapes, world, args)
            k_big = ks[shapes[big]]
            if bound_s > max(ideal_s, member[1]) * (1 + 1e-12):  # the bound is two matrices on one rank
                k_big = max(k_big, 2)
            split_s = min(crit_s, capacity_s + rounds_s)  # capacity <= bound; min() drops float noise
            above = sum(1 for c in costs if ns_seconds(c, args) > ideal_s)
            saves = {}
            for r in scale:
                if r["model"] == name and r["world"] == world:
                    comm_s, elem_s = r["comm_ms"] / 1e3, r["elementwise_ms"] / 1e3
                    split_step = elem_s + max(comm_s, split_s)
                    saves[r["topology"]] = dict(step_ms=r["marsm_step_ms"], split_step_ms=1e3 * split_step,
                                                saves_ms=r["marsm_step_ms"] - 1e3 * split_step)
            team_s, team_k = team_plan_seconds(shapes, world, args)
            rows.append(dict(model=name, world=world, largest_shape=shapes[big], matrices_above_ideal=above,
                             ns_crit_teams_ms=1e3 * team_s, team_max_k=team_k,
                             member_ms={k: 1e3 * t for k, t in member.items()}, ns_ideal_ms=1e3 * ideal_s,
                             ns_bound_ms=1e3 * bound_s, ns_crit_ms=1e3 * crit_s,
                             ns_crit_split_simple_ms=1e3 * (simple_s + rounds_s),
                             ns_crit_split_ms=1e3 * split_s, k_largest=k_big,
                             k_per_shape={"x".join(map(str, sh)): k for sh, k in ks.items()},
                             ns_saves_ms=1e3 * (crit_s - split_s), step=saves))
    return rows


# --- mixture of experts ---------------------------------------------------------------------------

@cache
def expert_layout(shape: tuple[int, int], coord: int, ep: int, world: int) -> MatrixLayout:
    """One routed expert of EP coordinate ``coord``: ranks r = coord mod ``ep`` hold it whole, each
    as its own copy; copy j is EP group j (ranks j * ep ... j * ep + ep - 1), whose other ranks hold
    nothing of it. It is what ``per_expert`` makes of the stacked (E, rows, cols) weight sharded
    over EP (Shard(0)) and replicated over the W / ep expert-data-parallel ranks, and its
    ``preferred_owners`` are its holders. One object per (shape, coordinate): every expert of that
    coordinate shares it."""
    n = math.prod(shape)
    pieces = tuple((Piece(0, 0, n),) if r % ep == coord else () for r in range(world))
    return MatrixLayout(tuple(shape), pieces, replicas=tuple(r // ep for r in range(world)))


def moe_layouts(shapes: list[tuple[int, int]], expert_of: list[int | None], experts: int, ep: int,
                world: int) -> list[MatrixLayout]:
    """Experts whole on their EP coordinate's ranks (E / ep consecutive experts per coordinate,
    :func:`expert_layout`), dense matrices FSDP rows over all ``world`` ranks."""
    if experts % ep or world % ep:
        raise ValueError(f"EP {ep} must divide the experts ({experts}) and the world size ({world})")
    per = experts // ep
    return [topology_layout("fsdp", s, "col", world) if e is None else expert_layout(s, e // per, ep, world)
            for s, e in zip(shapes, expert_of, strict=True)]


def candidate_bound(costs: list[int], candidates: list[tuple[int, ...] | None], world: int) -> int:
    """No assignment of whole matrices that gives each matrix an owner among its candidates (None:
    any rank) gives the busiest rank less: ``lower_bound`` of all matrices over ``world`` ranks, and
    for every candidate set S, ``lower_bound`` of the matrices whose candidates lie within S over
    |S| ranks (an EP coordinate's experts cannot leave its W / EP ranks)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for cost, cand in zip(costs, candidates, strict=True):
        if cand is not None:
            groups.setdefault(cand, []).append(cost)
    sets = {cand: frozenset(cand) for cand in groups}
    bound = lower_bound(costs, world)
    for cand, ranks in sets.items():
        inside = [c for other, members in sets.items() if members <= ranks for c in groups[other]]
        bound = max(bound, lower_bound(inside, len(cand)))
    return bound


def moe_bytes_floor(layouts: list[MatrixLayout], itemsize: int = WIRE_ITEMSIZE) -> float:
    """Bytes the busiest rank receives at least, whatever the owners: the mean over ranks of what
    a step must move. A matrix held whole by h ranks (an expert and its copies): h - 1 of them
    receive its result (its owner one of them, nothing gathered); a matrix cut over one copy
    (FSDP rows): its owner receives what it lacks and the others their rows back, at least 2 x
    (elements - the most one rank holds)."""
    total = 0
    by_id = {id(lay): lay for lay in layouts}
    for key, count in Counter(id(lay) for lay in layouts).items():
        lay = by_id[key]
        holders = sum(1 for r in range(lay.world_size) if lay.local_numel(r) == lay.numel)
        total += count * ((holders - 1) * lay.numel if holders else 2 * (lay.numel - lay.max_local_numel))
    return total * itemsize / layouts[0].world_size if layouts else 0.0


def ns_calls(plan: ExchangePlan, shapes: list[tuple[int, int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Per round, per rank: the Newton-Schulz calls it makes batched (``orthogonalize`` on a GPU:
    one per distinct shape up to a transpose among the round's matrices it owns) and unbatched
    (one per matrix)."""
    world = plan.world_size
    batched, single = [], []
    for bucket in plan.buckets:
        groups = {(plan.owners[i], min(shapes[i]), max(shapes[i])) for i in bucket}
        calls, count = [0] * world, [0] * world
        for owner, _, _ in groups:
            calls[owner] += 1
        for i in bucket:
            count[plan.owners[i]] += 1
        batched.append(calls)
        single.append(count)
    return batched, single


def launch_path_seconds(plan: ExchangePlan, calls: list[list[int]], args: argparse.Namespace) -> float:
    """The critical path with every call's matmul launches (``--launch-us`` each) added to its
    owner's round."""
    per_call = NS_STEPS * MATMULS_PER_STEP * args.launch_us * 1e-6
    return sum(max(ns_seconds(f, args) + c * per_call for f, c in zip(load, n, strict=True))
               for load, n in zip(plan.round_loads(), calls, strict=True))


def moe_received(layouts: list[MatrixLayout], owners: list[int], ranks: list[int], gpus_per_node: int
                 ) -> dict[int, tuple[int, int, int]]:
    """Per rank of ``ranks``: (intra-node, inter-node, minimum) bytes received, by
    :func:`received_split` and ``received_bytes``. Matrices with the same layout object and owner
    (the experts of one coordinate that one holder owns) are counted once, times their number."""
    pairs = Counter((id(lay), owner) for lay, owner in zip(layouts, owners, strict=True))
    by_id = {id(lay): lay for lay in layouts}
    by_count: dict[int, tuple[list[MatrixLayout], list[int]]] = {}
    for (key, owner), count in pairs.items():
        lays, owns = by_count.setdefault(count, ([], []))
        lays.append(by_id[key])
        owns.append(owner)
    out = {}
    for r in ranks:
        intra = inter = minimum = 0
        for count, (lays, owns) in by_count.items():
            a, b = received_split(lays, owns, r, gpus_per_node)
            intra, inter = intra + count * a, inter + count * b
            minimum += count * received_bytes(lays, owns, r, WIRE_ITEMSIZE)[1]
        out[r] = (intra, inter, minimum)
    return out


def moe_row(name: str, shapes: list[tuple[int, int]], expert_of: list[int | None], experts: int, ep: int,
            world: int, args: argparse.Namespace) -> dict:
    """One MoE row (see the module docstring) for ``shapes`` at ``ep`` x ``world / ep``."""
    layouts = moe_layouts(shapes, expert_of, experts, ep, world)
    candidates = [lay.preferred_owners for lay in layouts]
    plan = make_plan(shapes, world, "balanced", args.moe_bucket_numel, ns_steps=NS_STEPS,
                     candidates=candidates)
    owners = list(plan.owners)
    costs = list(plan.costs)
    numels = [math.prod(s) for s in shapes]
    bound = candidate_bound(costs, candidates, world)
    gathered = off = 0
    for lay, owner, e in zip(layouts, owners, expert_of, strict=True):
        if e is not None and lay.local_numel(owner) != lay.numel:
            off += 1
            gathered += lay.numel - lay.local_numel(owner)
    ranks = sample_ranks(world, owners, numels, args.sample_ranks, args.gpus_per_node)
    got = moe_received(layouts, owners, ranks, args.gpus_per_node)
    bytes_rank = max(ranks, key=lambda r: (got[r][0] + got[r][1], -r))
    comm_rank = max(ranks, key=lambda r: (comm_seconds(got[r][0], got[r][1], args), -r))
    batched, single = ns_calls(plan, shapes)
    calls_b = [sum(c[r] for c in batched) for r in range(world)]
    calls_u = [sum(c[r] for c in single) for r in range(world)]
    busiest = max(range(world), key=lambda r: (plan.ns_flops[r], -r))
    crit = plan.critical_path_flops
    held = Counter()  # per EP coordinate, its experts' NS FLOPs (what each of its ranks holds)
    for cost, e in zip(costs, expert_of, strict=True):
        if e is not None:
            held[e // (experts // ep)] += cost
    return dict(
        model=name, ep=ep, world=world, edp=world // ep, matrices=len(shapes),
        expert_matrices=sum(e is not None for e in expert_of), experts_per_layer=experts,
        rounds=len(plan.buckets), bucket_numel=args.moe_bucket_numel, ranks_evaluated=len(ranks),
        ns_crit_flops=crit, ns_bound_flops=bound, ns_busiest_flops=plan.ns_flops[busiest],
        ns_total_flops=sum(costs), ns_crit_ms=1e3 * ns_seconds(crit, args),
        ns_bound_ms=1e3 * ns_seconds(bound, args), ns_ideal_ms=1e3 * ns_seconds(sum(costs) / world, args),
        crit_over_bound=crit / bound, busiest_over_bound=plan.ns_flops[busiest] / bound,
        target=MOE_TARGET, meets_target=crit <= MOE_TARGET * bound,
        bytes_max_rank=sum(got[bytes_rank][:2]), bytes_min_max_rank=max(got[r][2] for r in ranks),
        bytes_floor=moe_bytes_floor(layouts), comm_rank=comm_rank, comm_intra_bytes=got[comm_rank][0],
        comm_inter_bytes=got[comm_rank][1], comm_ms=1e3 * comm_seconds(*got[comm_rank][:2], args),
        expert_gather_bytes=gathered * WIRE_ITEMSIZE, experts_off_holders=off,
        expert_ns_held_ms=1e3 * ns_seconds(max(held.values(), default=0), args),
        ns_calls_batched_max=max(calls_b), ns_calls_unbatched_max=max(calls_u),
        ns_calls_busiest_owner=(calls_b[busiest], calls_u[busiest]),
        matmul_launches_batched_max=max(calls_b) * NS_STEPS * MATMULS_PER_STEP,
        matmul_launches_unbatched_max=max(calls_u) * NS_STEPS * MATMULS_PER_STEP,
        launch_us=args.launch_us, ns_crit_launch_batched_ms=1e3 * launch_path_seconds(plan, batched, args),
        ns_crit_launch_unbatched_ms=1e3 * launch_path_seconds(plan, single, args))


def moe_rows(args: argparse.Namespace, models=MOE_RUN, eps=MOE_EPS, worlds=MOE_WORLDS,
             layers: int | None = None) -> list[dict]:
    """One row per (MoE model, EP, W) with W a multiple of EP; ``layers`` MoE layers (default:
    ``--moe-layers``, else all)."""
    layers = getattr(args, "moe_layers", None) if layers is None else layers
    rows = []
    for name in models:
        shapes, expert_of, experts = moe_shapes(name, layers)
        for ep in eps:
            for world in worlds:
                if world % ep == 0:
                    rows.append(moe_row(name, shapes, expert_of, experts, ep, world, args))
    return rows


# --- output ---------------------------------------------------------------------------------------

def print_header(args: argparse.Namespace) -> None:
    print("Scale model, plan only (no processes). Figures (flags):")
    print(f"  NS: {args.tflops:g} TFLOP/s bf16 dense peak x {args.ns_efficiency:g} efficiency (ASSUMED) = "
          f"{flop_rate(args) / 1e12:.1f} TFLOP/s; plain form, {NS_STEPS} iterations")
    print(f"  HBM {args.hbm_gbs:g} GB/s; NVLink {args.nvlink_gbs:g} GB/s per GPU within a node of "
          f"{args.gpus_per_node}; {args.internode_gbs:g} GB/s per GPU across nodes (GB = 1e9 B)")
    print(f"  elementwise: MARS-M {MARSM_BYTES_PER_ELEM} B/elem (fp32 p, g, m, g_prev read; p, m, g_prev "
          f"written), AdamW {ADAMW_BYTES_PER_ELEM} B/elem (fp32 p, g, m, v read; p, m, v written)")
    print("  comm: receive side, bf16 wire, intra / NVLink + inter / inter-node; sends assumed symmetric,")
    print("        links not shared, no latency; busiest rank over "
          + ("every rank" if args.sample_ranks <= 0 else f"~{args.sample_ranks} sampled ranks + extremes"))
    print("  MARS-M step = elementwise + max(comm, NS critical path) (pipelined) | + comm + NS (serial)")


def print_tables(scale: list[dict], split: list[dict]) -> None:
    print("\nBalanced owner plan. MiB = 2^20 B the busiest rank receives per step (inter: the slowest")
    print("rank's inter-node part); idle % = 1 - ideal / critical path; idle-step ms = what the idle")
    print("ranks add to the pipelined step (vs NS at the ideal), and its % of that step; AG = all-gather")
    print("design (every rank gathers every matrix and runs all NS itself)")
    head = (f"{'model':<10} {'W':>4} {'topo':<4} {'mesh':>6} {'MiB max':>8} {'inter':>7} {'comm':>7} "
            f"{'NS crit':>7} {'ideal':>6} {'idle%':>5} {'idle-step':>13} {'elem':>6} "
            f"{'MARS-M pipe/serial':>18} {'AdamW':>6} {'AG MiB':>7} {'AG step':>8}")
    print(head)
    print(f"{'':<10} {'':>4} {'':<4} {'':>6} {'':>8} {'MiB':>7} {'ms':>7} {'ms':>7} {'ms':>6} {'':>5} "
          f"{'ms (%step)':>13} {'ms':>6} {'ms':>18} {'ms':>6} {'':>7} {'ms':>8}")
    for r in scale:
        mesh = "x".join(map(str, r["mesh"]))
        idle = f"{r['step_idle_ms']:.1f} ({100 * r['step_idle_share']:.0f}%)"
        step = f"{r['marsm_step_ms']:.1f} / {r['marsm_step_serial_ms']:.1f}"
        print(f"{r['model']:<10} {r['world']:>4} {r['topology']:<4} {mesh:>6} "
              f"{r['bytes_max_rank'] / MIB:>8.1f} {r['comm_inter_bytes'] / MIB:>7.1f} {r['comm_ms']:>7.1f} "
              f"{r['ns_crit_ms']:>7.1f} {r['ns_ideal_ms']:>6.1f} {100 * r['idle_share']:>5.1f} {idle:>13} "
              f"{r['elementwise_ms']:>6.1f} "
              f"{step:>18} {r['adamw_step_ms']:>6.1f} {r['allgather_bytes_max_rank'] / MIB:>7.0f} "
              f"{r['allgather_step_ms']:>8.1f}")
    print("\nSplitting NS over k GPUs of one node (column blocks, Gram all-reduce over NVLink): the")
    print("largest matrix's member time per k; bound: the least busiest-rank load whole matrices allow")
    print("(ExchangePlan.lower_bound_flops; crit - bound is lost to the rounds, bound - ideal to")
    print("whole-matrix ownership); critical path with splits: simple = max(ideal, max over matrices of")
    print("min_k member time), capacity = the same counting the rank-time a split costs (k members each),")
    print("both + the rounds' loss (kept); k: the largest matrix's split in the capacity estimate; NS and")
    print("pipelined MARS-M step savings (capacity estimate; comm, elementwise, bytes unchanged)")
    ks = " ".join(f"{'k=' + str(k):>6}" for k in SPLIT_KS)
    print(f"{'model':<10} {'W':>4} {'largest':>11} {'#>ideal':>7} {ks} {'ideal':>7} {'bound':>7} {'crit':>7} "
          f"{'simple':>7} {'capac.':>7} {'k':>2} {'NS saves':>8} {'step saves fsdp/hsdp/ddp':>24} "
          f"{'teams=8 (k)':>12}")
    for r in split:
        shape = "x".join(map(str, r["largest_shape"]))
        member = " ".join(f"{r['member_ms'][k]:>6.2f}" for k in SPLIT_KS)
        saves = "/".join(f"{r['step'][t]['saves_ms']:.1f}" for t in SCALE_TOPOLOGIES if t in r["step"])
        print(f"{r['model']:<10} {r['world']:>4} {shape:>11} {r['matrices_above_ideal']:>7} {member} "
              f"{r['ns_ideal_ms']:>7.2f} {r['ns_bound_ms']:>7.2f} {r['ns_crit_ms']:>7.2f} "
              f"{r['ns_crit_split_simple_ms']:>7.2f} {r['ns_crit_split_ms']:>7.2f} "
              f"{r['k_largest']:>2} {r['ns_saves_ms']:>8.2f} {saves:>24} "
              f"{r['ns_crit_teams_ms']:>7.2f} ({r['team_max_k']})")
    print("(all times ms; teams=8: the NS critical path of the plan MARSM runs with ns_team_max=8, "
          "with its busiest team's traffic)")


def print_moe_table(rows: list[dict], args: argparse.Namespace) -> None:
    print("\nMixture of experts: experts whole on their EP rank and its W/EP copies (rank = edp x EP + c),")
    print("dense matrices FSDP rows over all W; engine plan with candidates = MatrixLayout.preferred_owners,")
    print(f"bucket {args.moe_bucket_numel} elements. crit / bound: NS critical path over the lower bound "
          f"(target <= {MOE_TARGET}; * misses);")
    print("busy/bnd: the busiest owner's total over the bound; MiB: the busiest sampled rank receives / "
          "the floor any owners")
    print("allow (mean over ranks) / its inter-node part; exp.gath: MiB gathered for experts (owner not "
          "a holder: how many);")
    print("calls: NS calls of the busiest owner, batched by shape / one per matrix (max over owners); "
          f"crit+launch: crit with {args.launch_us:g} us")
    print(f"per matmul launch ({NS_STEPS} iterations x {MATMULS_PER_STEP} matmuls per call), batched / "
          "unbatched; self: NS ms of one rank's")
    print("experts if every copy ran them itself instead of receiving them (no expert bytes)")
    head = (f"{'model':<18} {'EP':>3} {'W':>5} {'edp':>4} {'rnds':>4} {'NS crit':>8} {'bound':>7} "
            f"{'crit/bnd':>9} {'busy/bnd':>8} {'MiB max':>8} {'floor':>7} {'inter':>7} {'comm':>6} "
            f"{'exp.gath':>8} {'self':>7} {'calls b / u':>13} {'crit+launch b / u':>18}")
    print(head)
    print(f"{'':<18} {'':>3} {'':>5} {'':>4} {'':>4} {'ms':>8} {'ms':>7} {'':>9} {'':>8} {'':>8} {'':>7} "
          f"{'':>7} {'ms':>6} {'MiB (n)':>8} {'ms':>7} {'':>13} {'ms':>18}")
    for r in rows:
        mark = " " if r["meets_target"] else "*"
        calls = f"{r['ns_calls_batched_max']} / {r['ns_calls_unbatched_max']}"
        launch = f"{r['ns_crit_launch_batched_ms']:.1f} / {r['ns_crit_launch_unbatched_ms']:.1f}"
        gath = f"{r['expert_gather_bytes'] / MIB:.0f} ({r['experts_off_holders']})"
        print(f"{r['model']:<18} {r['ep']:>3} {r['world']:>5} {r['edp']:>4} {r['rounds']:>4} "
              f"{r['ns_crit_ms']:>8.2f} {r['ns_bound_ms']:>7.2f} {r['crit_over_bound']:>8.3f}{mark} "
              f"{r['busiest_over_bound']:>8.3f} {r['bytes_max_rank'] / MIB:>8.1f} "
              f"{r['bytes_floor'] / MIB:>7.1f} "
              f"{r['comm_inter_bytes'] / MIB:>7.1f} {r['comm_ms']:>6.1f} {gath:>8} "
              f"{r['expert_ns_held_ms']:>7.1f} {calls:>13} {launch:>18}")
    missed = sum(not r["meets_target"] for r in rows)
    print(f"({missed} of {len(rows)} rows miss crit / bound <= {MOE_TARGET})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=989.0, help="bf16 dense peak, TFLOP/s (H100 SXM)")
    ap.add_argument("--ns-efficiency", type=float, default=0.6,
                    help="fraction of the peak Newton-Schulz's matmuls reach (an assumption)")
    ap.add_argument("--hbm-gbs", type=float, default=3350.0, help="HBM bandwidth, GB/s")
    ap.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink, GB/s per GPU within a node")
    ap.add_argument("--internode-gbs", type=float, default=50.0, help="GB/s per GPU across nodes")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--sample-ranks", type=int, default=64,
                    help="ranks evaluated per (model, W), plus the extremes of owned elements; 0: every rank")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/scale_model.json"))
    ap.add_argument("--models", nargs="+", choices=SCALE_MODELS + MOE_RUN,
                    default=list(SCALE_MODELS + MOE_RUN),
                    help="models to run (default: all; Llama: the first two tables, MoE: the third)")
    ap.add_argument("--moe-layers", type=int, default=None, help="MoE layers per MoE model (default: all)")
    ap.add_argument("--moe-bucket-numel", type=int, default=1 << 26,
                    help="the MoE plans' bucket: full-matrix elements per owner per round (engine default)")
    ap.add_argument("--launch-us", type=float, default=5.0,
                    help="ASSUMED cost of one matmul launch (CPU dispatch + launch), microseconds")
    return ap


def main() -> None:
    args = parser().parse_args()
    t0 = time.perf_counter()
    print_header(args)
    dense = [m for m in SCALE_MODELS if m in args.models]
    moe_models = [m for m in MOE_RUN if m in args.models]
    scale = scale_rows(args, models=dense) if dense else []
    split = split_rows(args, scale, models=dense) if dense else []
    if dense:
        print_tables(scale, split)
    moe = moe_rows(args, models=moe_models) if moe_models else []
    if moe_models:
        print_moe_table(moe, args)
    seconds = time.perf_counter() - t0
    print(f"({seconds:.1f} s)")
    if args.json:
        machine = {"plan_only": True, "python": platform.python_version(), "seconds": round(seconds, 1)}
        if dense:
            save_results(args.json, "scale", args, machine, scale)
            save_results(args.json, "split", args, machine, split)
        if moe_models:
            save_results(args.json, "moe", args, machine, moe)


if __name__ == "__main__":
    main()
