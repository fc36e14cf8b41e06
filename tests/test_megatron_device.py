"""MARS-M's Megatron distributed optimizer built the way it is on GPUs, checked on a CPU machine.

On GPUs Megatron's tensor x data-parallel group is NCCL, which serves CUDA tensors only: a CPU
tensor in one of its collectives fails ("No backend type associated with device type cpu"). Here
the meta device stands in for the GPU: Megatron's CUDA allocations go to meta (the test shim),
and the default group is torch's fake backend registered for the meta device only, which refuses
CPU tensors the same way. One forked process plays rank 0 of 4 (TP=2 x DP=2).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("megatron.core")

from tests.helpers.distributed import run_with_fake_group  # noqa: E402

pytestmark = pytest.mark.distributed
TP = 2


class _OtherRanksCoordinates(TorchFunctionMode):
    """Answers the host read of the gathered coordinates (TP, DP, expert TP, EP, expert DP rank) with
    what 4 ranks would send.

    The fake group moves no data, so the gathered tensor has no values; every other host read of a
    meta tensor is refused, so an unexpected one fails the test.
    """

    def __init__(self, coordinates: list[list[int]]) -> None:
        super().__init__()
        self.coordinates = coordinates
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if t is not None and t.device.type == "meta" and func is torch.Tensor.tolist:
            assert tuple(t.shape) == (len(self.coordinates), 5), t.shape
            self.reads += 1
            return self.coordinates
        if t is not None and t.device.type == "meta" and func in (torch.Tensor.item, torch.Tensor.__int__,
                                                                  torch.Tensor.__bool__, torch.Tensor.cpu):
            raise AssertionError(f"unexpected host read {func.__name__} of a meta tensor {tuple(t.shape)}")
        return func(*args, **(kwargs or {}))


def build_on_meta(rank, world_size):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    from marsm_dist.adapters.megatron import ShardedMARSMOptimizer, marsm_routes
    from tests.helpers.megatron_cpu_shim import CpuCudaShim

    CpuCudaShim(device="meta").install()  # Megatron's CUDA tensors (parameters, buffers) go to meta
    ps.initialize_model_parallel(tensor_model_parallel_size=TP, create_gloo_process_groups=False)
    model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, tensor_model_parallel_size=TP, add_bias_linear=False,
                            gradient_accumulation_fusion=False, persist_layer_norm=False)
    with torch.device("meta"):  # and so do the tensors made without a device (norms)
        model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                         max_sequence_length=16)
    ddp = DistributedDataParallel(config=model.config, module=model,
                                  ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
    assert all(p.device.type == "meta" for p in ddp.parameters())
    group = ps.get_tensor_and_data_parallel_group()
    # Group rank g of the TP x DP group is (TP rank g % TP, DP rank g // TP) in Megatron's order;
    # without MoE its expert coordinates are (expert TP = TP rank, EP 0, expert DP = DP rank).
    group_size = torch.distributed.get_world_size(group)
    coordinates = [[g % TP, g // TP, g % TP, 0, g // TP] for g in range(group_size)]
    # The optimizer as get_megatron_marsm_optimizer builds it, minus Megatron's own grouping (which
    # agrees on group keys through an object all-gather: a fake group has no objects to give).
    routes = marsm_routes([ddp])
    groups = [{"params": [p for p in ddp.parameters() if routes[id(p)] is use], "use_marsm": use}
              for use in (True, False)]
    config = OptimizerConfig(optimizer="adam", lr=0.02, use_distributed_optimizer=True)
    with _OtherRanksCoordinates(coordinates) as reads:
        opt = ShardedMARSMOptimizer(config, [ddp], groups, {"lr": 0.02, "ns_dtype": torch.float32}, None,
                                    lambda opt, config=None: opt.init_state())
    return (group_size, reads.reads, sum(len(g["params"]) for g in groups),
            sorted({str(p.device) for g in opt.optimizer.param_groups for p in g["params"]}))


def test_distributed_optimizer_builds_when_the_group_serves_only_the_parameters_device():
    """Construction gathers every rank's (TP, DP) coordinates over the TP x DP group; the tensors
    must be on the parameters' device (the GPU), not the CPU, or NCCL refuses them."""
    group_size, reads, params, devices = run_with_fake_group(build_on_meta, 4)
    assert group_size == 4 and params > 0
    assert reads == 1  # one host read of all coordinates, not one per rank and value
    assert devices == ["meta"]  # the main shards live where the parameters do
