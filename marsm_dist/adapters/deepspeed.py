"""DeepSpeed: ``"optimizer": {"type": "MARSM", "params": {...}}`` in the JSON config, ZeRO 0-3.

``import marsm_dist.adapters.deepspeed`` before ``deepspeed.initialize`` is the whole setup (the
import calls :func:`install`, which is idempotent; importing ``marsm_dist`` alone touches nothing):

* DeepSpeed resolves an unknown optimizer type by ``getattr(torch.optim, name)`` and has no
  plugin registry, so this module teaches its engine the name ``MARSM`` (any case), builds the
  optimizer with the model's real parameter names and shapes (embeddings and the head go to
  the AdamW branch, as :func:`marsm_dist.param_groups` decides), and lists MARSM among the
  optimizers ZeRO accepts (no ``zero_allow_untested_optimizer`` needed).
* Under ZeRO the optimizer only sees flat fp32 partitions. Once DeepSpeed has built them, this
  module describes each partition as slots: every original parameter of the group, with the
  flat range each data-parallel rank holds of it (a range may start mid-row, and a matrix may
  span ranks). The sharding engine then rebuilds each matrix on one owner rank for
  Newton-Schulz, exactly as for FSDP2.
* DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``) at ZeRO-1/2: a moe group's partition
  (cut over the expert-data-parallel ranks) is described over the dense data-parallel group, each
  local expert parameter as the ``(EP, *shape)`` tensor of that local expert on every EP rank, and
  the group gets ``experts=True``: every global expert is one matrix, orthogonalized once in the
  job by a rank that holds it (:mod:`marsm_dist.adapters.deepspeed_moe`). ZeRO-3 refuses MoE.
* Under ZeRO-0 every data-parallel rank holds every parameter: MARSM's ``process_group`` becomes
  the group DeepSpeed all-reduces the gradients over (unless the user set one), so each matrix's
  Newton-Schulz runs on one of those ranks and the result is broadcast, as for torch DDP.

DeepSpeed applies its gradient clipping and its fp16/bf16 overflow check before it calls
``MARSM.step``; an overflow step never reaches the optimizer, so momentum, P and parameters stay
untouched. ``engine.save_checkpoint``/``load_checkpoint`` save and restore MARS-M's state as it
is (flat, per partition), at the same world size. To resume at another world size, ZeRO stage or
framework, export the state with :func:`marsm_dist.checkpoint.save_neutral` (``docs/checkpoints.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    import deepspeed  # noqa: F401
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('marsm_dist.adapters.deepspeed needs DeepSpeed: pip install "marsm-dist[deepspeed]"'
                      ) from err

import torch
import torch.distributed as dist
from torch import Tensor

from ..checkpoint.held import register_master_sync, register_wrapper_view
from ..optimizer import MARSM
from ..options import CONFIG_OPTIONS
from ..param_groups import param_decisions, split_by_route, split_experts
from ..sharding.adapter import SideTableAdapter, Slot, check_group_serves, register_adapter
from ..sharding.layout import MatrixLayout, Piece, flat_overlap
from ._common import refuse_exact_mode
from .deepspeed_checkpoint import master_sync, patch_universal_loading, zero3_view
from .deepspeed_files import register as register_checkpoint_files
from .deepspeed_moe import describe_moe_group, is_moe_group

__all__ = ["DeepSpeedAdapter", "build_marsm", "describe_partitions", "install"]

#: Asked after Megatron's DP-shard adapter and before its TP one (see marsm_dist.sharding.adapter):
#: a ZeRO-3 placeholder of a Megatron-style TP layer carries both marks, and its shape is DeepSpeed's.
PRIORITY = 30

# What optimizer.params may set: every MARSM option a config file can hold.
_OPTIONS = {o.name for o in CONFIG_OPTIONS}


_EXACT_MODE = ("MARSM(approx=False) is not supported under DeepSpeed ZeRO/bf16 wrappers: the exact mode "
               "needs the look-ahead gradient before the step, and DeepSpeed only hands reduced "
               "gradients to the optimizer inside engine.step(). Use approx=True (the default).")


class DeepSpeedAdapter(SideTableAdapter):
    """ZeRO flat fp32 partitions (registered by :func:`describe_partitions` with their slots and
    process group) and ZeRO-3 placeholders (1-D until gathered; the real shape is ``ds_shape``)."""

    name = "deepspeed"
    prepopulate_state = False  # ZeRO replaces the parameters after the optimizer is built

    def handles(self, p: Tensor) -> bool:
        return super().handles(p) or hasattr(p, "ds_shape")

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        known = self.info(p)  # (slots, group) of a flat partition
        return known[1] if known is not None else None

    def slots(self, p: Tensor) -> list[Slot]:
        known = self.info(p)
        if known is not None:
            return known[0]
        return [Slot(tuple(p.ds_shape))]


_ADAPTER = DeepSpeedAdapter()


def _shape_of(p: Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def build_marsm(module: torch.nn.Module, model_parameters: Iterable[Any], options: dict[str, Any]) -> MARSM:
    """MARSM from a DeepSpeed config's ``optimizer.params``, routed by ``module``'s names.

    Groups that carry ``"use_marsm"`` keep it; any other group is split into its MARS-M and
    AdamW parts (other keys kept), as :func:`marsm_dist.param_groups` would route them.
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"Unknown MARSM option(s) {unknown} in the DeepSpeed config's optimizer.params; "
                         f"valid options: {sorted(_OPTIONS)}")
    decisions = param_decisions(module, shape_of=_shape_of)
    routes = {id(p): d.use_marsm for p, d in decisions}
    stacked = {id(p) for p, d in decisions if d.experts}
    items = list(model_parameters)
    groups = items if items and isinstance(items[0], dict) else [{"params": items}]
    routed = []
    for group in groups:
        group = {**group, "params": list(group["params"])}
        if "use_marsm" in group:
            routed.append(group)
            continue
        routed += split_by_route(group, lambda p: routes.get(id(p), len(_shape_of(p)) >= 2))
    return MARSM(split_experts(routed, lambda p: id(p) in stacked), **options)


def _flat_slots(params, offsets, partition_size: int, group, names) -> list[Slot]:
    """Slots of one ZeRO-1/2 (or BF16_Optimizer) partition: rank q holds [q*ps, (q+1)*ps) of the
    group's flat buffer, and parameter k occupies [offsets[k], offsets[k] + numel)."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    slots = []
    for p, off in zip(params, offsets, strict=True):
        n, pieces = p.numel(), []
        for q in range(world):
            held = flat_overlap((off, off + n), (q * partition_size, (q + 1) * partition_size))
            pieces.append((Piece(0, *held),) if held else ())
        local = max(off, me * partition_size) - me * partition_size
        mine = sum(pc.numel for pc in pieces[me])
        slots.append(Slot(tuple(p.shape), MatrixLayout(tuple(p.shape), tuple(pieces)), local if mine else 0,
                          mine, names.get(p)))
    return slots


def _stage3_slots(params, group, names) -> list[Slot]:
    """Slots of one ZeRO-3 sub-group: each parameter is flattened and split in ceil(n/W) chunks
    (the last rank's chunk padded); the rank's chunks of the sub-group are concatenated."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    slots, offset = [], 0
    for p in params:
        n, shape, chunk = p.ds_numel, tuple(p.ds_shape), p.partition_numel()
        held = [flat_overlap((0, n), (q * chunk, (q + 1) * chunk)) for q in range(world)]
        pieces = tuple((Piece(0, *h),) if h else () for h in held)
        mine = sum(pc.numel for pc in pieces[me])
        # Only the real elements: the padding of the last chunk holds uninitialised memory.
        slots.append(Slot(shape, MatrixLayout(shape, pieces), offset, mine, names.get(p)))
        offset += chunk
    return slots


def _tag(flat: Tensor, slots: list[Slot], group) -> None:
    # Refused here, when the engine is built: with offload_optimizer the partitions live on the CPU.
    check_group_serves(group, flat.device, f"a ZeRO partition of {flat.numel()} elements")
    _ADAPTER.register(flat, (slots, group))


def _tag_flat(wrapper: Any, i: int, flat: Tensor, params, offsets, partition_size: int, names) -> None:
    """Tag group ``i``'s flat ZeRO-1/2 (or BF16_Optimizer) partition; a DeepSpeed MoE group's
    MARS-M partition is described over the dense group, one ``(EP, *expert)`` tensor per parameter."""
    pg, group = wrapper.real_dp_process_group[i], wrapper.optimizer.param_groups[i]
    moe = (describe_moe_group(group, params, offsets, partition_size, pg, wrapper.dp_process_group, names)
           if is_moe_group(group) else None)
    if moe is not None:
        _tag(flat, *moe)
    else:
        _tag(flat, _flat_slots(params, offsets, partition_size, pg, names), pg)


def describe_partitions(wrapper: Any, names: dict[Tensor, str]) -> None:
    """Tag the flat fp32 partitions a DeepSpeed optimizer wrapper feeds MARSM with their slots."""
    refuse_exact_mode((g["approx"] for g in wrapper.optimizer.param_groups), _EXACT_MODE)
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
        for sg, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            pg = (wrapper._get_sub_group_process_group(sg)
                  if hasattr(wrapper, "_get_sub_group_process_group") else wrapper.dp_process_group)
            _tag(flat, _stage3_slots(wrapper.fp16_groups[sg], pg, names), pg)
    elif hasattr(wrapper, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            _tag_flat(wrapper, i, flat, wrapper.round_robin_bit16_groups[i],
                      wrapper.round_robin_bit16_offsets[i], wrapper.partition_size[i], names)
    elif hasattr(wrapper, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1, fp32 accumulation)
        for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
            params = wrapper.bf16_groups[i]
            offsets = [sum(p.numel() for p in params[:k]) for k in range(len(params))]
            size = wrapper.bf16_groups_flat[i].numel() // dist.get_world_size(
                wrapper.real_dp_process_group[i])
            _tag_flat(wrapper, i, flat, params, offsets, size, names)
    else:
        raise NotImplementedError(f"MARSM does not know DeepSpeed's {type(wrapper).__name__} yet")


def _replicated_group(engine: Any) -> dist.ProcessGroup | None:
    """The group a ZeRO-0 engine's parameters are replicated over: the one its
    ``allreduce_gradients`` reduces (dense) gradients over, as
    ``DeepSpeedEngine._reduce_non_expert_gradients`` picks it (the data-parallel group times
    sequence parallelism, or the pipeline grid's data-parallel group)."""
    if getattr(engine, "pipeline_parallelism", False) and engine.mpu is not None:
        return engine.mpu.get_data_parallel_group()
    return engine.seq_data_parallel_group


def _share_newton_schulz(engine: Any) -> None:
    """ZeRO-0: give the engine's MARSM the data-parallel group as ``process_group``, so each
    matrix is orthogonalized on one replica and broadcast, instead of on every rank.

    Left alone: a group the user set; ZeRO 1-3 and the BF16_Optimizer (MARSM sees partitions that
    carry their own group); MoE models (expert weights are replicated over another group)."""
    opt = getattr(engine, "basic_optimizer", None)
    if not isinstance(opt, MARSM) or opt.process_group is not None:
        return
    if engine.zero_optimization() or getattr(engine, "has_moe_layers", False):
        return
    if any(_ADAPTER.info(p) is not None for g in opt.param_groups for p in g["params"]):
        return  # a partitioning wrapper (the BF16_Optimizer of a pipeline engine)
    group = _replicated_group(engine)
    if group is not None and dist.get_world_size(group) > 1:
        opt.process_group = group


def _is_marsm(name: Any) -> bool:
    return isinstance(name, str) and name.lower() == "marsm"


def _patch_engine() -> None:
    """Teach DeepSpeedEngine the optimizer type "MARSM" (idempotent)."""
    if getattr(DeepSpeedEngine, "_marsm_patched", False):
        return
    supported, basic = DeepSpeedEngine._is_supported_optimizer, DeepSpeedEngine._configure_basic_optimizer
    configure_optimizer = DeepSpeedEngine._configure_optimizer
    zero, bf16 = DeepSpeedEngine._configure_zero_optimizer, DeepSpeedEngine._configure_bf16_optimizer

    def is_supported(self, optimizer_name):
        return _is_marsm(optimizer_name) or supported(self, optimizer_name)

    def configure_basic(self, model_parameters):
        if self.client_optimizer is None and _is_marsm(self.optimizer_name()):
            return build_marsm(self.module, model_parameters, dict(self.optimizer_params() or {}))
        return basic(self, model_parameters)

    def configure_optimizer_and_group(self, client_optimizer, model_parameters):
        # After the wrappers are built: both ways in (JSON config and client optimizer) pass here.
        configure_optimizer(self, client_optimizer, model_parameters)
        _share_newton_schulz(self)

    def wrap(configure):
        def configure_wrapped(self, optimizer):
            wrapper = configure(self, optimizer)
            if isinstance(getattr(wrapper, "optimizer", None), MARSM):
                describe_partitions(wrapper, getattr(self, "param_names", {}) or {})
            return wrapper
        return configure_wrapped

    DeepSpeedEngine._is_supported_optimizer = is_supported
    DeepSpeedEngine._configure_basic_optimizer = configure_basic
    DeepSpeedEngine._configure_optimizer = configure_optimizer_and_group
    DeepSpeedEngine._configure_zero_optimizer = wrap(zero)
    DeepSpeedEngine._configure_bf16_optimizer = wrap(bf16)
    DeepSpeedEngine._marsm_patched = True


def install() -> None:
    """Teach DeepSpeed the optimizer type ``"MARSM"`` and register this adapter (idempotent).

    Patches ``DeepSpeedEngine`` (see :func:`_patch_engine`), lists MARSM among the optimizers ZeRO
    accepts and as ``torch.optim.MARSM`` (the name DeepSpeed's own fallback looks up). Importing
    this module calls it, which is the documented setup: ``import marsm_dist.adapters.deepspeed``
    before ``deepspeed.initialize``.
    """
    if MARSM not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(MARSM)
    torch.optim.MARSM = MARSM
    _patch_engine()
    register_adapter(_ADAPTER, priority=PRIORITY)
    register_wrapper_view(zero3_view)
    register_master_sync(master_sync)
    patch_universal_loading()
    register_checkpoint_files()


install()  # for `import marsm_dist.adapters.deepspeed`, the one line the recipes document
