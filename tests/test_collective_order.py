"""The collectives of a step, in the order NCCL needs: the checker itself, the two reproductions
that once broke it (team groups made by their members only; a replica group's broadcast posted
at a rank-dependent point), and every sharded topology on the meta device with the fake group
(which, like NCCL, serves device tensors only).

Every gloo test in the suite that runs through ``run_distributed`` is checked the same way (see
``tests/helpers/distributed.py``); here each topology also runs as all W ranks of a fake group,
where no data moves and every rank's order can still be compared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard

from marsm_dist import MARSM
from marsm_dist.diagnostics import HostReads
from marsm_dist.newton_schulz import NS_COEFFICIENTS
from marsm_dist.orthogonalize import NSConfig
from marsm_dist.sharding import ShardingEngine, row_chunks
from tests.helpers.collective_order import Event, check_collective_order
from tests.helpers.distributed import collective_logs, run_distributed, run_fake_ranks

pytestmark = pytest.mark.distributed

D = 16


# ------------------------------------------------------------------------------- the checker itself

def ev(group: str, ranks, op: str = "all_reduce", sig=((4, "f32"),), splits=None) -> Event:
    return Event(group, tuple(ranks), op, sig, splits)


def test_checker_accepts_a_consistent_job():
    w, g01 = ev("0", [0, 1, 2]), ev("g", [0, 1], "broadcast")
    logs = {0: [w, g01, w], 1: [w, g01, w], 2: [w, w]}
    check_collective_order(logs)


@pytest.mark.parametrize("case", ["missing", "size", "splits", "interleave", "no-log"])
def test_checker_refuses_what_would_hang_on_nccl(case):
    w, g01 = ev("0", [0, 1]), ev("g", [0, 1], "broadcast")
    logs = {0: [w, g01], 1: [w, g01]}
    if case == "missing":
        logs[1] = [w]
    elif case == "size":
        logs[1] = [ev("0", [0, 1], sig=((5, "f32"),)), g01]
    elif case == "splits":
        logs = {0: [ev("0", [0, 1], "all_to_all_single", ("f32",), ((1, 2), (1, 3)))],
                1: [ev("0", [0, 1], "all_to_all_single", ("f32",), ((2, 1), (2, 1)))]}
    elif case == "interleave":
        logs[1] = [g01, w]
    else:
        logs = {0: [ev("0", [0, 1, 2])], 1: [ev("0", [0, 1, 2])]}
    with pytest.raises(AssertionError):
        check_collective_order(logs)


# --------------------------------------------------------------------- reproduction 1: team groups

def two_team_plans(rank, world_size, device: str = "cpu"):
    """Two engines over the same job group: teams (0, 1), then (0, 1, 2, 3). Team groups made by
    their members only got names from each rank's own count of groups, so the second plan's
    group had different names on ranks 0-1 and 2-3, and all four hung in ``new_group``."""
    layout = [row_chunks((64, 512), world_size)]
    cfg = NSConfig(5, torch.float32, NS_COEFFICIENTS)
    engines = []
    for max_team in (2, 4):
        engine = ShardingEngine(layout, dist.group.WORLD, "balanced", 1 << 20, device=torch.device(device),
                                max_team=max_team)
        engine.orthogonalize([torch.randn(layout[0].local_numel(rank), device=device)], [cfg])
        engines.append(engine)
    teams = [e.plan.teams for e in engines]
    for e in engines:
        e.close()
    return teams


def test_two_team_plans_on_gloo_make_their_groups_together():
    results = run_distributed(two_team_plans, 4, timeout=90)
    assert results[0] == [((0, 1),), ((0, 1, 2, 3),)]


def test_two_team_plans_on_the_fake_group():
    run_fake_ranks(two_team_plans, 4, "meta")


def stage_team_plans(rank, world_size):
    """Two pipeline stages, each its own job group ({0, 1} and {2, 3}, smaller than the world, no
    device bound): a team in each stage's plan, made by each rank for its own set, twice (the
    first plan closed before the second: the group is kept and reused, as one destroyed and made
    again under the same name could meet the old one's addresses in the store)."""
    stages = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    job = stages[rank // 2]
    layout = [row_chunks((64, 512), 2)]
    cfg = NSConfig(5, torch.float32, NS_COEFFICIENTS)
    teams = []
    for _ in range(2):
        engine = ShardingEngine(layout, job, "balanced", 1 << 20, max_team=2)
        engine.orthogonalize([torch.randn(layout[0].local_numel(rank % 2))], [cfg])
        teams.append(engine.plan.teams)
        engine.close()
    return teams


def test_team_groups_inside_a_job_group_smaller_than_the_world():
    assert run_distributed(stage_team_plans, 4, timeout=90) == [[((0, 1),), ((0, 1),)]] * 4


# --------------------------------------------------------------- reproduction 2: replica broadcasts

def meta_dtensor(mesh, shape: tuple[int, ...], placements) -> torch.nn.Parameter:
    """A meta DTensor parameter with its gradient, this rank's part as DTensor would cut it."""
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))

    def make() -> DTensor:
        return DTensor.from_local(torch.empty(local_shape, device="meta"), mesh, placements,
                                  run_check=False, shape=shape, stride=stride)

    p = torch.nn.Parameter(make())
    p.grad = make()
    return p


def steps(opt: MARSM, n: int = 2) -> None:
    for _ in range(n):
        with HostReads():
            opt.step()


def crossing_replica_groups(rank, world_size):
    """A 2 x 2 mesh with two replica patterns: ``(Shard(0), Replicate())`` (replica groups {0, 1}
    and {2, 3}) and ``(Replicate(), Shard(0))`` on 3 rows (replica groups {0, 2} and {1, 3}; 2 rows
    on mesh column 0, 1 row on column 1), round robin, buckets of 72 elements: two rounds. Rank 1's
    pieces of the second pattern are half rank 0's, so a posting window counted from this rank's
    own bytes posted the first round's {0, 1} broadcast before the second round's scatter (a
    job-group all-to-all) on rank 1, and after it on rank 0."""
    mesh = init_device_mesh("meta", (2, 2), mesh_dim_names=("a", "b"))
    first = [meta_dtensor(mesh, (4, 4), (Shard(0), Replicate())) for _ in range(4)]
    second = [meta_dtensor(mesh, (3, 16), (Replicate(), Shard(0))) for _ in range(4)]
    params = [p for pair in zip(second, first, strict=True) for p in pair]
    opt = MARSM(params, owner_policy="round_robin", bucket_bytes=4 * 72, timing=True)
    steps(opt)
    return opt._step_map.distributor.engine.plan.buckets


def test_replica_broadcasts_are_posted_in_the_same_order_on_every_rank():
    assert len(run_fake_ranks(crossing_replica_groups, 4)[0]) == 2


# ------------------------------------------------------- every sharded topology on the fake group

def gpt_shapes(layers: int = 2) -> list[tuple[int, int]]:
    return [s for _ in range(layers) for s in [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)]]


def meta_topology(rank, world_size, topology: str, options: dict):
    shapes = gpt_shapes()
    kwargs = dict(options)
    if topology == "fsdp2":
        mesh = init_device_mesh("meta", (world_size,))
        mats = [meta_dtensor(mesh, s, (Shard(0),)) for s in shapes]
        others = [meta_dtensor(mesh, (D,), (Shard(0),)), meta_dtensor(mesh, (50, D), (Shard(0),))]
    elif topology == "hsdp":
        mesh = init_device_mesh("meta", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
        mats = [meta_dtensor(mesh, s, (Replicate(), Shard(0))) for s in shapes]
        others = [meta_dtensor(mesh, (D,), (Replicate(), Shard(0)))]
    elif topology in ("fsdp_x_tp", "hsdp_x_tp"):
        dims = (2, 1, 2) if topology == "hsdp_x_tp" else (1, 2, 2)
        mesh = init_device_mesh("meta", dims, mesh_dim_names=("replicate", "shard", "tp"))
        col = (Replicate(), _StridedShard(0, split_factor=2), Shard(0))
        row = (Replicate(), Shard(0), Shard(1))
        mats = [meta_dtensor(mesh, s, col if k % 2 == 0 else row) for k, s in enumerate(shapes)]
        # A weight the TP plan replicates: a copy per (replicate, tp) coordinate.
        mats.append(meta_dtensor(mesh, (D, D), (Replicate(), Shard(0), Replicate())))
        others = [meta_dtensor(mesh, (D,), (Replicate(), Shard(0), Replicate()))]
    elif topology == "ddp":
        mats = [_meta_param(s) for s in shapes]
        others = [_meta_param((D,))]
        kwargs["process_group"] = dist.group.WORLD
    else:
        raise ValueError(topology)
    opt = MARSM([{"params": mats, "use_marsm": True}, {"params": others, "use_marsm": False}], **kwargs)
    steps(opt)
    return opt.last_step_stats.owned_matrices


def _meta_param(shape) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty(shape, device="meta"))
    p.grad = torch.empty(shape, device="meta")
    return p


SMALL_BUCKET = 4 * 3 * D * D  # one qkv matrix, counted as float32: many rounds


@pytest.mark.parametrize("topology", ["fsdp2", "hsdp", "fsdp_x_tp", "hsdp_x_tp", "ddp"])
@pytest.mark.parametrize("options", [
    {"overlap": True}, {"overlap": False}, {"overlap": True, "timing": True},
    {"overlap": True, "bucket_bytes": SMALL_BUCKET}, {"overlap": False, "bucket_bytes": SMALL_BUCKET},
], ids=["overlap", "serial", "timing", "overlap-rounds", "serial-rounds"])
def test_every_topology_issues_collectives_in_one_order(topology, options):
    owned = run_fake_ranks(meta_topology, 4, topology, options)
    assert sum(owned) == len(gpt_shapes()) + (topology.endswith("_tp"))


@pytest.mark.parametrize("overlap", [True, False])
def test_teams_issue_collectives_in_one_order(overlap):
    """W=8, three matrices: two teams of two split the large ones (as in test_device_paths)."""
    def run(rank, world_size):
        mesh = init_device_mesh("meta", (world_size,))
        mats = [meta_dtensor(mesh, s, (Shard(0),)) for s in [(4 * D, D), (D, 4 * D), (D, D)]]
        opt = MARSM(mats, ns_team_max=4, overlap=overlap)
        steps(opt)
        return opt._step_map.distributor.engine.plan.teams

    teams = run_fake_ranks(run, 8)
    assert sorted(len(t) for t in teams[0] if t) == [2, 2]


def test_the_gloo_runs_record_what_the_step_issues():
    """The records are real: a DDP step at W=2 logs the statistics' all-reduce and the owners'
    broadcasts, on the world group."""
    def run(rank, world_size):
        model = torch.nn.Linear(8, 8, bias=False)
        model.weight.grad = torch.ones(8, 8)
        opt = MARSM(model.parameters(), process_group=dist.group.WORLD)
        opt.step()

    logs = collective_logs(run, 2)
    ops = [e.op for e in logs[0]]
    assert "all_reduce" in ops and "broadcast" in ops, ops
    check_collective_order(logs)
