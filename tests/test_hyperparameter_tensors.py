"""Hyperparameters held in tensors (a tensor ``lr``, as torch's schedulers keep for compiled or
capturable optimizers): compared between ranks by value, exactly and whatever their device;
read with the step's one device-to-host read, never once per matrix or per group.

A CPU tensor is read at no cost and takes the number path. The device path (terms computed on
the device, the value read with the statistics) is exercised two ways: on ``meta`` with the fake
group, where host reads are counted (and answered with ones), and on CPU tensors treated as
device tensors (``as_device``), where the values are real and trajectories can be compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import marsm_dist._step_work as step_work
import marsm_dist.option_checks as option_checks
import marsm_dist.sharding.agreement as agreement
from marsm_dist import MARSM
from marsm_dist.diagnostics import HostReads
from tests.helpers.distributed import run_distributed, run_fake_ranks

TENSOR_KEYS = ("lr", "weight_decay", "adamw_eps")


def as_device(monkeypatch=None):
    """Treat CPU tensors as device tensors (their values then ride the step's one read)."""
    def on_device(value):
        return isinstance(value, torch.Tensor)

    for module in (option_checks, agreement, step_work):
        if monkeypatch is not None:
            monkeypatch.setattr(module, "on_device", on_device)
        else:
            module.on_device = on_device


def problem():
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(12, 8)), torch.nn.Parameter(torch.randn(8, 12))
    b = torch.nn.Parameter(torch.randn(8))
    return [w1, w2, b]


def run(hyper: dict, steps: int = 4, **kw):
    params = problem()
    opt = MARSM([{"params": params[:2], "use_marsm": True}, {"params": params[2:], "use_marsm": False}],
                ns_dtype=torch.float32, **hyper, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def tensors(values: dict, dtype=torch.float64) -> dict:
    return {k: (tuple(torch.tensor(x, dtype=dtype) for x in v) if isinstance(v, tuple)
                else torch.tensor(v, dtype=dtype)) for k, v in values.items()}


NUMBERS = {"lr": 0.02, "weight_decay": 0.1, "adamw_eps": 1e-8, "adamw_betas": (0.9, 0.95)}


def test_device_tensor_hyperparameters_step_exactly_as_numbers(monkeypatch):
    """lr, weight decay, eps and betas in (float64) tensors on the device path: bitwise the
    trajectory of the same Python floats."""
    want = run(NUMBERS)
    as_device(monkeypatch)
    got = run(tensors(NUMBERS))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_device_tensor_momentum_and_gamma(monkeypatch):
    """momentum and gamma are needed before the read (kappa): computed on the device instead."""
    values = {"momentum": 0.9, "gamma": 0.05}
    want = run(values)
    as_device(monkeypatch)
    got = run(tensors(values))
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), -1e-3])
def test_an_invalid_device_lr_is_refused_after_the_read_before_any_write(monkeypatch, bad):
    as_device(monkeypatch)
    params = problem()
    lr = torch.tensor(0.02)
    opt = MARSM([{"params": params[:2], "use_marsm": True}, {"params": params[2:], "use_marsm": False}],
                lr=lr)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    lr.fill_(bad)  # as a scheduler writes it
    with pytest.raises(ValueError, match=r"Invalid lr in param group 0.*left untouched"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(opt.state[p]["step"].item() == 1 for p in params)


# ----------------------------------------------------------------------------- agreement, W = 2

def agreement_run(rank, world_size, values: list, device_path: bool):
    if device_path:
        as_device()
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = MARSM([w], lr=values[rank], process_group=dist.group.WORLD)
    w.grad = torch.ones(8, 8)
    try:
        opt.step()
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.distributed
@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-tensors", "device-path"])
def test_values_are_compared_exactly(device_path):
    """lr 1e-3 against 1e-3 (1 + 1e-12): a difference no repr of a tensor shows ("tensor(0.0010)")."""
    lrs = [torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1e-3 * (1 + 1e-12), dtype=torch.float64)]
    out = run_distributed(agreement_run, 2, lrs, device_path)
    assert all(o is not None and "'lr' differs between ranks" in o for o in out), out


@pytest.mark.distributed
@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-tensors", "device-path"])
def test_equal_values_agree_whatever_their_type(device_path):
    """A Python float on one rank and a float64 tensor of the same value on the other agree (the
    digest of the value, not of its repr, which names the dtype and the device)."""
    out = run_distributed(agreement_run, 2, [1e-3, torch.tensor(1e-3, dtype=torch.float64)], device_path)
    assert out == [None, None]


def test_the_device_digest_equals_the_host_digest():
    """The digits computed on the device are the host's for the same value (so a rank holding a
    number and one holding a device tensor are compared alike)."""
    for x in (1e-3, 0.0, -2.5, 3e38, 1e-310):
        terms, value = agreement._device_terms(torch.tensor(x, dtype=torch.float64), torch.device("cpu"))
        assert terms.tolist() == agreement._terms(agreement._code(x))
        assert value.tolist() == [x]


# ------------------------------------------------------------------------- one host read, on meta

def meta_tensor_lr_run(rank, world_size):
    """FSDP2-style meta DTensors at W=4 over the fake group (the agreement path runs, as under any
    job group), with lr, weight decay, momentum, gamma and betas in meta tensors."""
    mesh = init_device_mesh("meta", (world_size,))

    def param(*shape):
        local = (shape[0] // world_size, *shape[1:])

        def make():
            return DTensor.from_local(torch.empty(local, device="meta"), mesh, [Shard(0)], run_check=False,
                                      shape=shape, stride=torch.empty(shape, device="meta").stride())

        p = torch.nn.Parameter(make())
        p.grad = make()
        return p

    on = {k: torch.tensor(v, device="meta") for k, v in
          {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "gamma": 0.05}.items()}
    betas = (torch.tensor(0.9, device="meta"), torch.tensor(0.95, device="meta"))
    opt = MARSM([{"params": [param(32, 16), param(16, 16)], "use_marsm": True},
                 {"params": [param(16)], "use_marsm": False}], adamw_betas=betas, **on)
    counts = []
    for _ in range(3):
        with HostReads() as reads:
            opt.step()
        counts.append(reads.count)
    return counts


@pytest.mark.distributed
def test_device_tensor_hyperparameters_cost_no_extra_host_read():
    assert run_fake_ranks(meta_tensor_lr_run, 4) == [[1, 1, 1]] * 4


def test_one_host_read_with_a_meta_lr_in_one_process():
    p = torch.nn.Parameter(torch.empty(16, 8, device="meta"))
    q = torch.nn.Parameter(torch.empty(8, device="meta"))
    opt = MARSM([{"params": [p], "use_marsm": True}, {"params": [q], "use_marsm": False}],
                lr=torch.tensor(0.01, device="meta"), weight_decay=torch.tensor(0.1, device="meta"))
    counts = []
    for _ in range(3):
        p.grad, q.grad = torch.empty_like(p), torch.empty_like(q)
        with HostReads() as reads:
            opt.step()
        counts.append(reads.count)
    assert counts == [1, 1, 1]
