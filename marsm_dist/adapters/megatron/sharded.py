"""MARS-M with its state sharded over Megatron's data-parallel ranks (``use_distributed_optimizer``).

Megatron's DDP, built with ``DistributedDataParallelConfig(use_distributed_optimizer=True)``,
keeps a model chunk's parameters and gradients in flat buffers cut into buckets and every bucket
into one equal shard per data-parallel (DP) rank. It reduce-scatters gradients, so DP rank ``d``
holds the summed gradient of shard ``d`` only, and all-gathers the parameter buffer after the step.

:class:`ShardedMARSMOptimizer` owns exactly those shards, the way Megatron's own (Adam-only)
``DistributedOptimizer`` does: the part of each parameter that falls in this rank's bucket shards
becomes an fp32 *main shard* (a 1-D tensor), and one ``MARSM`` steps the main shards. The main
shard of a hidden matrix is a flat range of this rank's tensor-parallel (TP) block, i.e. a piece
of the full logical matrix; the sharding engine gathers a matrix's pieces from the TP x DP ranks
that hold them to its owner, which runs Newton-Schulz on the whole matrix and scatters the
update back. Optimizer state (momentum, last gradient, Adam moments, fp32 master weights) exists
only for the main shards: 1/DP of what a replicated optimizer keeps.

MoE and context parallelism: Megatron keeps expert-parallel weights in separate buffers sharded
over the expert-data-parallel (EDP) ranks, and dense ones over DP x CP. A main shard of local expert
``i`` is a flat range of that expert on its EP rank, described (``expert_layout``) as a piece of the
``(EP, *expert)`` tensor over the job group, and split per global expert by ``MARSM`` (the
builder's ``experts=True`` groups).

Checkpoints (``sharded_state_dict``): each rank writes its own ranges of every parameter's state as
pieces of the same global tensors the non-distributed MARS-M optimizer writes, so they load at any
TP/DP size, with or without the distributed optimizer, and no rank ever holds more than its shard
(:mod:`marsm_dist.adapters.megatron.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
from megatron.core.tensor_parallel import copy_tensor_model_parallel_attributes
from torch import Tensor

from ...optimizer import MARSM
from ...sharding.adapter import SideTableAdapter, Slot, register_adapter
from ...sharding.layout import flat_overlap
from .checkpoint import load_flat_state, sharded_flat_state
from .routing import match_param_groups
from .tp_adapter import is_expert_parallel
from .tp_layout import RankCoordinates, dp_range_layout, expert_layout, job_group, rank_coordinates, tp_layout

__all__ = ["MegatronDPShardAdapter", "ShardedMARSMOptimizer", "dp_shard_ranges"]


@dataclass
class _Shard:
    """This rank's part of one model parameter."""

    name: str
    param: Tensor  # the model parameter (a view into the DDP parameter buffer)
    ranges: list[tuple[int, int]]  # [start, stop) of the flattened local param, per DP rank
    dp_rank: int
    main: Tensor  # fp32 copy of this rank's range: what MARSM steps

    @property
    def start(self) -> int:
        return self.ranges[self.dp_rank][0]

    @property
    def stop(self) -> int:
        return self.ranges[self.dp_rank][1]

    def model_range(self, t: Tensor) -> Tensor:
        return t.view(-1)[self.start:self.stop]


def dp_shard_ranges(model_chunks: list[torch.nn.Module]
                    ) -> dict[Tensor, tuple[list[tuple[int, int]], int]]:
    """param -> (the ``[start, stop)`` of its flattened local tensor in each rank's bucket shards, this
    rank's index among them).

    Mirrors how Megatron's grad buffers are reduce-scattered: each bucket is split into one equal
    contiguous shard per rank of the buffer's group (DP, with CP when CP > 1; for expert-parallel
    buffers, expert DP); a parameter may straddle shards (then several ranks hold pieces).
    """
    out: dict[Tensor, tuple[list[tuple[int, int]], int]] = {}
    for chunk in model_chunks:
        buffers = getattr(chunk, "buffers", None)
        if buffers is None:
            raise TypeError(f"use_distributed_optimizer needs Megatron DistributedDataParallel model chunks; "
                            f"got {type(chunk).__name__}")
        for buffer in list(buffers) + list(getattr(chunk, "expert_parallel_buffers", None) or []):
            dp_size = buffer.data_parallel_world_size
            me = dist.get_rank(buffer.data_parallel_group) if dp_size > 1 else 0
            for bucket in buffer.buckets:
                size = bucket.grad_data.numel() // dp_size
                shards = [(bucket.offset + d * size, bucket.offset + (d + 1) * size) for d in range(dp_size)]
                for p in bucket.params:
                    start, end, _ = buffer.param_index_map[p]
                    out[p] = ([flat_overlap((start, end), shard) or (0, 0) for shard in shards], me)
    return out


def _params_device(param_groups: list[dict[str, Any]], model_chunks: list[torch.nn.Module]) -> torch.device:
    """The device of the parameters (so of the main shards) this optimizer steps."""
    for p in (p for g in param_groups for p in g["params"]):
        return p.device
    for p in (p for chunk in model_chunks for p in chunk.parameters()):
        return p.device  # a rank with nothing to step still joins the coordinates' all-gather
    raise ValueError("use_distributed_optimizer: the model chunks have no parameters")


class MegatronDPShardAdapter(SideTableAdapter):
    """Main shards of :class:`ShardedMARSMOptimizer`, registered with their (slot, group) when they
    are created. Asked before the TP adapter (priority 40 against 20): a main shard carries its
    parameter's TP attributes, which the TP adapter would claim."""

    name = "megatron-dp-shard"
    prepopulate_state = False  # Megatron calls init_state_fn when it needs state templates

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        return self.info(p)[1]

    def slots(self, p: Tensor) -> list[Slot]:
        return [self.info(p)[0]]

    def checkpoint_slots(self, p: Tensor) -> list[Slot]:
        return [self.info(p)[2]]


_ADAPTER = MegatronDPShardAdapter()


def checkpoint_slot(shard: _Shard, coords: list[RankCoordinates], pg: dist.ProcessGroup | None) -> Slot:
    """What the neutral checkpoint form reads of a main shard: its parameter's full shape and
    layout on either branch (the step's slot of an AdamW-branch shard is only its flat range)."""
    p, numel = shard.param, shard.stop - shard.start
    if is_expert_parallel(p):  # refused by the neutral form, by name (expert=)
        return Slot(tuple(p.shape), None, 0, numel, shard.name, expert=0)
    if pg is None:
        return Slot(tuple(p.shape), None, 0, numel, shard.name)
    layout = dp_range_layout(p, coords, shard.ranges)
    return Slot(layout.shape, layout, 0, numel, shard.name)
PRIORITY = 40  # the highest built-in: see MegatronDPShardAdapter and marsm_dist.sharding.adapter


class ShardedMARSMOptimizer(MixedPrecisionOptimizer):
    """A ``MegatronOptimizer`` whose MARSM steps this DP rank's shards of every parameter.

    Built by ``get_megatron_marsm_optimizer`` when ``config.use_distributed_optimizer`` is set;
    see the module docstring. ``param_groups`` are Megatron's groups of model parameters, each
    with ``use_marsm``; ``marsm_kwargs`` go to :class:`MARSM`.
    """

    def __init__(self, config: OptimizerConfig, model_chunks: list[torch.nn.Module],
                 param_groups: list[dict[str, Any]], marsm_kwargs: dict[str, Any],
                 grad_scaler: MegatronGradScaler | None, init_state_fn: Callable) -> None:
        for chunk in model_chunks:
            ddp_config = getattr(chunk, "ddp_config", None)
            if ddp_config is None or not ddp_config.use_distributed_optimizer:
                raise ValueError("OptimizerConfig.use_distributed_optimizer=True needs the model wrapped in "
                                 "Megatron DistributedDataParallel with DistributedDataParallelConfig("
                                 "use_distributed_optimizer=True) (Megatron-LM sets both from "
                                 "--use-distributed-optimizer)")
            if ddp_config.num_distributed_optimizer_instances > 1:
                raise NotImplementedError("num_distributed_optimizer_instances > 1 is not supported")
        self.model_chunks = model_chunks
        self.ddp_config = model_chunks[0].ddp_config
        group = job_group()  # TP x DP (x CP): the same ranks as expert TP x EP x expert DP
        coords = (rank_coordinates(group, _params_device(param_groups, model_chunks))
                  if group is not None else [RankCoordinates(0, 0, 0, 0, 0)])
        ranges = dp_shard_ranges(model_chunks)
        names = {p: n for chunk in model_chunks for n, p in chunk.named_parameters()}

        register_adapter(_ADAPTER, priority=PRIORITY)  # this optimizer is what fills its side table
        self._shards: list[_Shard] = []
        groups = []
        for g in param_groups:
            mains = []
            for p in g["params"]:
                if p not in ranges:
                    raise ValueError(f"{names.get(p, tuple(p.shape))} is not in the DDP buffers (frozen?)")
                shard = _Shard(names.get(p, ""), p, *ranges[p], torch.empty(0))
                shard.main = shard.model_range(p.detach()).float().clone()
                # Megatron's grad-norm and zero-count helpers read these from the tensors they see.
                copy_tensor_model_parallel_attributes(shard.main, p)
                shard.main.shared = getattr(p, "shared", False)
                _ADAPTER.register(shard.main, (self._slot(shard, g, coords, group), group,
                                               checkpoint_slot(shard, coords, group)))
                self._shards.append(shard)
                mains.append(shard.main)
            groups.append({**g, "params": mains})
        optimizer = MARSM(groups, **marsm_kwargs)
        super().__init__(optimizer, config, grad_scaler, init_state_fn)
        self.is_stub_optimizer = False
        self.grad_stats_parallel_group = dist.group.WORLD  # each element is on exactly one DP rank

    @staticmethod
    def _slot(shard: _Shard, group: dict[str, Any], coords: list[RankCoordinates],
              pg: dist.ProcessGroup | None) -> Slot:
        p, numel = shard.param, shard.stop - shard.start
        expert = bool(group.get("experts")) and is_expert_parallel(p)
        if not group["use_marsm"] or (pg is None and not expert):
            return Slot(tuple(p.shape) if pg is None else (numel,), None, 0, numel, shard.name)
        if not getattr(p, "tensor_model_parallel", False):
            raise NotImplementedError(f"{shard.name}: a matrix that is not tensor-parallel (replicated over "
                                      f"TP ranks, e.g. a MoE router) cannot take the MARS-M update under "
                                      f"the distributed optimizer yet; train without "
                                      f"use_distributed_optimizer")
        if expert:  # local expert i of every EP rank as one (EP, *expert) tensor, split per expert
            if pg is None:
                return Slot((1, *p.shape), None, 0, numel, f"{shard.name}@ep")
            layout = expert_layout(p, coords, parallel_state.get_expert_tensor_parallel_world_size(),
                                   shard.ranges)
            return Slot(layout.shape, layout, 0, numel, f"{shard.name}@ep")
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        layout = tp_layout(p, [(c.tp, c.dp) for c in coords], tp_size, shard.ranges)
        return Slot(layout.shape, layout, 0, numel, shard.name)

    @property
    def shards(self) -> list[_Shard]:
        """This rank's part of every parameter, in the order of MARSM's parameters."""
        return self._shards

    # -- MixedPrecisionOptimizer hooks -------------------------------------------------------------

    def _collect_main_grad_data_for_unscaling(self) -> list[Tensor]:
        return [s.main.grad for s in self._shards if s.main.grad is not None]

    def _copy_model_grads_to_main_grads(self) -> None:
        for s in self._shards:
            grad = getattr(s.param, "main_grad", None)
            # After the reduce-scatter only this rank's range of the grad buffer holds the sum.
            s.main.grad = None if grad is None else s.model_range(grad).float()

    def _copy_main_params_to_model_params(self) -> None:
        for s in self._shards:
            s.model_range(s.param.data).copy_(s.main)

    def _copy_model_params_to_main_params(self, state_dict: Any = None) -> None:
        for s in self._shards:
            s.main.copy_(s.model_range(s.param.data))

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        ok = super().step_with_ready_grads()
        if not self.ddp_config.overlap_param_gather:
            for chunk in self.model_chunks:  # all-gather every rank's updated ranges
                chunk.start_param_sync()
        return ok

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self._shards:
            s.main.grad = None
            s.param.grad = None

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards: MARSM state, fp32 main shards, loss scaler (``--ckpt-format torch``)."""
        out = {"optimizer": self.optimizer.state_dict(), "main_params": [s.main for s in self._shards]}
        if self.grad_scaler is not None:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load either :meth:`state_dict` or a loaded :meth:`sharded_state_dict`."""
        if "main_params" in state_dict:
            saved = state_dict["optimizer"]
            saved["param_groups"] = match_param_groups(self.optimizer.param_groups, saved["param_groups"])
            self.optimizer.load_state_dict(saved)
            for s, saved in zip(self._shards, state_dict["main_params"], strict=True):
                s.main.copy_(saved)
        else:
            load_flat_state(self, state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def sharded_state_dict(self, model_sharded_state_dict: Any, is_loading: bool = False,
                           metadata: dict | None = None, **kwargs: Any) -> dict[str, Any]:
        """Megatron dist-checkpointing form: this rank's ranges of the parameters' global state tensors.

        Views of the live state, no copies: see :mod:`.checkpoint`. ``metadata``
        (Megatron's ``distrib_optim_sharding_type``) is ignored: there is one format.
        """
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        sd = sharded_flat_state(self, model_sharded_state_dict, is_loading)
        if self.grad_scaler is not None:
            sd["grad_scaler"] = self.grad_scaler.state_dict()
        return sd
