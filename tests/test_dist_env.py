"""The demo gives each rank its own GPU, or refuses before any process group when there are fewer
GPUs than ranks on the machine. The rule is a pure function of (local rank, local ranks, GPUs);
the CUDA queries are faked, so these run on a CPU machine."""

from __future__ import annotations

import pytest
import torch

from marsm_dist.demo import dist_env
from marsm_dist.demo.__main__ import main
from marsm_dist.demo.dist_env import TooFewGPUsError, cuda_device_index

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")


@pytest.mark.parametrize(("local_rank", "local_world", "gpus"), [
    (0, 1, 1), (0, 2, 2), (1, 2, 2), (3, 4, 8), (7, 8, 8), (0, None, 1), (2, None, 4)])
def test_each_rank_gets_its_own_gpu(local_rank, local_world, gpus):
    assert cuda_device_index(local_rank, local_world, gpus) == local_rank


@pytest.mark.parametrize(("local_rank", "local_world", "gpus", "needed"), [
    (0, 2, 1, 2), (1, 2, 1, 2), (0, 8, 4, 8), (5, 8, 4, 8), (1, None, 1, 2), (3, 2, 2, 4)])
def test_more_ranks_than_gpus_is_refused(local_rank, local_world, gpus, needed):
    with pytest.raises(TooFewGPUsError) as err:
        cuda_device_index(local_rank, local_world, gpus)
    msg = str(err.value)
    assert f"{needed} ranks on this machine but {gpus} CUDA GPU(s)" in msg
    assert f"--world-size {gpus}" in msg and f"NUM_PROCS={gpus}" in msg and "CUDA_VISIBLE_DEVICES" in msg


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA GPU, as far as the demo's checks can tell; nothing may start."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def refuse(*args, **kwargs):
        raise AssertionError("a process group or a rank was started despite too few GPUs")

    monkeypatch.setattr(dist_env.dist, "init_process_group", refuse)
    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    monkeypatch.setattr("marsm_dist.demo.launch.spawn", refuse)
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)


def test_demo_launcher_refuses_once_before_starting_ranks(one_gpu, capsys):
    assert main(["--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "2 ranks on this machine but 1 CUDA GPU(s)" in err


def test_under_a_launcher_only_local_rank_0_says_it(one_gpu, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert main([]) == 2
        assert ("1 CUDA GPU(s)" in capsys.readouterr().err) == (rank == 0)


def test_deepspeed_launchers_local_size_counts(one_gpu, monkeypatch, capsys):
    """The deepspeed launcher says LOCAL_SIZE, not LOCAL_WORLD_SIZE: its rank 0 of 2 must refuse too."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_SIZE", "2")
    assert main([]) == 2
    assert "2 ranks on this machine but 1 CUDA GPU(s)" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's name wins where both are set
    assert dist_env.local_world_size_from_env() == 3


def test_init_from_env_refuses_before_the_process_group(one_gpu, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    with pytest.raises(TooFewGPUsError, match="2 ranks on this machine but 1"):
        dist_env.init_from_env(threads=1)


def test_one_rank_on_one_gpu_is_fine(one_gpu):
    dist_env.check_gpus(1)  # no error: the single rank gets cuda:0
