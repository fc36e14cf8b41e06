"""Offloaded optimizer state: shards on the CPU, the exchange and Newton-Schulz on the job group's
device (``marsm_dist.sharding.offload``).

- Trajectory (CPU, gloo): runs whose shards go through the staging (the exchange device forced to
  the CPU with ``pin_memory=False``: every staging copy runs) step exactly as unstaged runs: the
  engine alone (every layout kind, with and without copies), FSDP2 ``fully_shard`` and DeepSpeed
  ZeRO-2/3 with ``offload_optimizer``.
- Device discipline: the ``meta`` device stands for the GPU, under torch's fake process group
  registered for ``meta`` only, which refuses CPU tensors as NCCL does. CPU shards (FSDP2's
  ``CPUOffloadPolicy``) are served: every collective gets meta tensors, the step reads the host
  once, and the staged device memory stays within two buckets at any model size.
- Refusals: a group that serves neither the shards' device nor a device to stage CPU shards to.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.testing._internal.distributed.fake_pg import FakeStore

from marsm_dist import MARSM
from marsm_dist.diagnostics import HostReads, PeakMemory
from marsm_dist.sharding import ShardingEngine, Staging, check_group_serves, cut
from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed, run_with_fake_group
from tests.test_device_paths import gpt_matrices, ns_bucket_peak
from tests.test_engine import FP32, fulls, layouts_for

pytestmark = pytest.mark.distributed
CPU = torch.device("cpu")
STEPS = 4


def force_staging() -> None:
    """In this (forked) worker: every optimizer stages its shards through the CPU."""
    import marsm_dist._step_work as step_work
    from marsm_dist.sharding.distributor import Distributor

    step_work.Distributor = functools.partial(Distributor, exchange_device=CPU, pin_memory=False)


# ------------------------------------------------------------------------------------- trajectory

def engine_outputs(rank, world_size, staged, overlap):
    layouts = layouts_for(world_size)
    staging = Staging(CPU, pin_memory=False) if staged else None
    engine = ShardingEngine(layouts, dist.group.WORLD, "balanced", 80, overlap=overlap, staging=staging)
    local = [cut(lay, m)[rank] for lay, m in zip(layouts, fulls(layouts), strict=True)]
    out = engine.orthogonalize(local, [FP32] * len(layouts))
    assert all(o is None or o.device == CPU for o in out)
    moved = (staging.bytes_to_device, staging.bytes_to_host) if staged else None
    return out, moved


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
def test_staged_engine_equals_unstaged(overlap):
    """Six layouts (rows, ZeRO flat ranges, TP blocks, a tiny one) in several rounds at W=3."""
    plain = run_distributed(engine_outputs, 3, False, overlap)
    staged = run_distributed(engine_outputs, 3, True, overlap)
    for (want, _), (got, moved) in zip(plain, staged, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        assert moved[0] > 0 and moved[1] > 0


def staged_replicated_run(rank, world_size, staged):
    import tests.test_engine as te

    if staged:  # (this forked worker's own copy of the module)
        te.ShardingEngine = functools.partial(ShardingEngine, staging=Staging(CPU, pin_memory=False))
    return te.replicated_run(rank, world_size, "balanced")["out"]


def test_staged_engine_with_copies_equals_unstaged():
    """DDP and HSDP layouts: results that reach a copy by broadcast come back through the staging."""
    plain = run_distributed(staged_replicated_run, 4, False)
    staged = run_distributed(staged_replicated_run, 4, True)
    for want, got in zip(plain, staged, strict=True):
        assert len(want) == 4 and all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def fsdp2_run(rank, world_size, staged, kw):
    if staged:
        force_staging()
    model = fm.shard(fm.build("gpt"), world_size)
    opt = fm.make_opt(model, **kw)
    fm.train("gpt", model, opt, STEPS, approx=True, rank=rank, world_size=world_size)
    staging = opt._step_map.distributor.staging
    assert (staging is not None) == staged
    return fm.full_params(model), staging.bytes_to_device if staged else 0


@pytest.mark.parametrize("kw", [dict(ns_dtype=torch.float32, bucket_bytes=40_000),
                                dict(ns_dtype=torch.bfloat16, overlap=False)], ids=["fp32", "bf16-serial"])
def test_fsdp2_offloaded_step_equals_the_plain_one(kw):
    plain = run_distributed(fsdp2_run, 2, False, kw)
    staged = run_distributed(fsdp2_run, 2, True, kw)
    for (want, _), (got, moved) in zip(plain, staged, strict=True):
        assert moved > 0
        assert all(torch.equal(got[n], want[n]) for n in want), max(
            (got[n] - want[n]).abs().max().item() for n in want)


def deepspeed_run(rank, world_size, stage, staged):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import marsm_dist.adapters.deepspeed  # noqa: F401
    from tests.test_deepspeed import config, ds_train, engine_for, full_params

    if staged:
        force_staging()
    zero = {"stage": stage, "offload_optimizer": {"device": "cpu"}}
    engine, opt = engine_for(rank, world_size, config(stage, world_size, zero_optimization=zero,
                                                      zero_force_ds_cpu_optimizer=False))
    ds_train(engine, rank, world_size, STEPS)
    assert (opt.optimizer._step_map.distributor.staging is not None) == staged
    return full_params(engine)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_offload_optimizer_step_equals_the_plain_one(stage):
    pytest.importorskip("deepspeed")
    plain = run_distributed(deepspeed_run, 2, stage, False, timeout=300)
    staged = run_distributed(deepspeed_run, 2, stage, True, timeout=300)
    for want, got in zip(plain, staged, strict=True):
        assert all(torch.equal(got[n], want[n]) for n in want)


# ---------------------------------------------------------------------- device discipline (meta)

D = 64
BUCKET = 4 * D * D * 4 * 2  # bytes: two MLP matrices, counted as float32


def offloaded_param(mesh, rank: int, shape: tuple[int, ...]) -> torch.nn.Parameter:
    """A DTensor as FSDP2's CPUOffloadPolicy leaves it: rows sharded over a device mesh, the local
    shard (and its grad) on the CPU."""
    world, rows = mesh.size(), shape[0]
    chunk = -(-rows // world)
    local_rows = max(0, min((rank + 1) * chunk, rows) - min(rank * chunk, rows))
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))

    def make() -> DTensor:
        local = torch.randn(local_rows, *shape[1:])
        meta = TensorMeta(torch.Size(shape), stride, local.dtype)
        return DTensor(local, DTensorSpec(mesh, (Shard(0),), meta), requires_grad=False)

    p = torch.nn.Parameter(make())
    p.grad = make()
    return p


class CollectiveDevices:
    """While active, the device types of every tensor handed to a collective, per collective."""

    NAMES = ("all_reduce", "all_to_all_single", "broadcast", "all_gather_into_tensor", "gather")

    def __init__(self) -> None:
        self.seen: dict[str, set[str]] = {}
        self._saved: dict = {}

    def __enter__(self) -> CollectiveDevices:
        for name in self.NAMES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            values = list(args) + list(kwargs.values())
            tensors = [t for v in values for t in (v if isinstance(v, (list, tuple)) else [v])
                       if isinstance(t, torch.Tensor)]
            self.seen.setdefault(name, set()).update(t.device.type for t in tensors)
            return fn(*args, **kwargs)
        return call


def offloaded_step(rank, world, shapes, kw):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("meta", (world,))
    mats = [offloaded_param(mesh, rank, s) for s in shapes]
    others = [offloaded_param(mesh, rank, (500, D)), offloaded_param(mesh, rank, (D,))]
    opt = MARSM([{"params": mats, "use_marsm": True}, {"params": others, "use_marsm": False}],
                bucket_bytes=BUCKET, **kw)
    before = [p.to_local().clone() for p in mats]
    with HostReads():
        opt.step()  # the first step makes the state and the plan
    with CollectiveDevices() as calls, HostReads() as reads, PeakMemory(device="meta") as mem:
        opt.step()
    staging = opt._step_map.distributor.staging
    changed = any(not torch.equal(a, p.to_local()) for a, p in zip(before, mats, strict=True))
    plan = opt._step_map.distributor.engine.plan
    owned = [[shapes[i] for i in b if plan.owners[i] == rank] for b in plan.buckets]
    ns_peak = max((ns_bucket_peak(shapes) for shapes in owned if shapes), default=0)
    return {"calls": calls.seen, "reads": reads.count, "peak": mem.peak, "staged_peak": staging.peak,
            "staged": staging.bytes_to_device, "device": str(staging.device), "changed": changed,
            "ns_peak": ns_peak, "teams": plan.teams}


@pytest.mark.parametrize(("rank", "kw"), [(0, {}), (3, {"overlap": False})], ids=["overlap", "serial"])
def test_offloaded_fsdp2_on_a_device_only_group(rank, kw):
    """CPU shards under a group that serves only the (stand-in) GPU, W=4: served; every collective
    takes device tensors (the fake group would refuse a CPU one, as NCCL does); the step reads the
    host at most once; the staged device buffers stay within two buckets, and the device memory
    the step allocates does not grow with the model (16 and 48 layers)."""
    results = {layers: run_with_fake_group(offloaded_step, 4, gpt_matrices(layers), kw, rank=rank)
               for layers in (16, 48)}
    for layers, r in results.items():
        assert r["device"] == "meta" and r["changed"] and r["staged"] > 0
        assert r["calls"]["all_reduce"] == {"meta"} and "all_to_all_single" in r["calls"], r["calls"]
        assert set().union(*r["calls"].values()) == {"meta"}, r["calls"]
        assert r["reads"] <= 1
        assert 0 < r["staged_peak"] <= 2 * BUCKET, (layers, r["staged_peak"])
        assert r["peak"] <= 1.2 * (2 * BUCKET + r["ns_peak"]), (layers, r["peak"], r["ns_peak"])
    assert results[48]["peak"] <= results[16]["peak"] * 1.05 + 4096


def test_offloaded_teams_run_on_the_device():
    """W=8, three matrices: idle ranks split Newton-Schulz (``ns_team_max``) on device tensors."""
    shapes = [(4 * D, D), (D, 4 * D), (D, D)]
    r = run_with_fake_group(offloaded_step, 8, shapes, {"ns_team_max": 4}, rank=1)
    assert any(r["teams"]) and "broadcast" in r["calls"] and r["changed"]
    assert set().union(*r["calls"].values()) == {"meta"}, r["calls"]


def replicated_offload_step(rank, world):
    """DDP (``process_group=``) with CPU parameters over the meta-only group: the owners' results
    reach the other ranks by broadcasts of device tensors."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(96, 32), (32, 96), (16, 16)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = MARSM(params, process_group=dist.group.WORLD)
    with CollectiveDevices() as calls, HostReads():
        opt.step()
        opt.step()
    return calls.seen, opt._step_map.distributor.staging.bytes_to_host


def test_offloaded_ddp_broadcasts_device_tensors():
    seen, back = run_with_fake_group(replicated_offload_step, 4, rank=1)
    assert set().union(*seen.values()) == {"meta"} and "broadcast" in seen, seen
    assert back > 0


# ----------------------------------------------------------------------------------------- refusals

def serves(backend: str, shards: str) -> str:
    dist.init_process_group(backend, store=FakeStore(), rank=0, world_size=2)
    try:
        return str(check_group_serves(dist.group.WORLD, torch.device(shards), "'w'"))
    except ValueError as err:
        return str(err)
    finally:
        dist.destroy_process_group()


def refusals(rank, world):
    dist.destroy_process_group()  # (the worker's own group: these tests make their own)
    out = {(b, d): serves(b, d) for b in ("meta:fake", "cuda:fake", "cpu:fake") for d in ("cpu", "meta")}
    dist.init_process_group("meta:fake", store=FakeStore(), rank=rank, world_size=world)
    return out


def test_groups_that_serve_neither_the_shards_nor_a_device_are_refused():
    """Also pinning, which needs CUDA: automatic (off) here, refused when asked for."""
    got = run_with_fake_group(refusals, 2)
    assert got[("meta:fake", "cpu")] == "meta"  # CPU shards, a device-only group: staged to it
    assert got[("meta:fake", "meta")] == "meta" and got[("cpu:fake", "cpu")] == "cpu"
    # An NCCL-like group in a process without CUDA; shards on a device the group does not serve.
    assert "serves only cuda tensors, and this process has no CUDA device" in got[("cuda:fake", "cpu")]
    for key in [("cuda:fake", "meta"), ("cpu:fake", "meta")]:
        assert "'w' is sharded on meta" in got[key] and "backend for their device" in got[key]
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="pin_memory=False on a CPU-only host"):
        Staging(torch.device("meta"), pin_memory=True)
    assert not Staging(torch.device("meta")).pin  # automatic: no CUDA, no pinning


def pin_option_run(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("meta", (world,))
    out = {}
    for pin in (False, True):
        try:  # (FSDP2 plans at construction: a refusal comes from the constructor)
            mats = [offloaded_param(mesh, rank, (D, D))]
            opt = MARSM([{"params": mats, "use_marsm": True}], pin_memory=pin)
            with HostReads():
                opt.step()
            out[pin] = opt._step_map.distributor.staging.pin
        except ValueError as err:
            out[pin] = str(err)
    return out


def test_the_pin_memory_option_reaches_the_staging():
    """MARSM(pin_memory=...) is what the staging uses: False stages unpinned; True on a host without
    CUDA is refused with the way out, when the optimizer is built."""
    out = run_with_fake_group(pin_option_run, 2)
    assert out[False] is False
    assert "pin_memory=False on a CPU-only host" in out[True]
