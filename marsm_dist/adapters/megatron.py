"""Megatron-core: tensor-parallel layouts and a MARS-M optimizer builder.

``get_megatron_marsm_optimizer(config, model_chunks, ...)`` takes the place of Megatron's
``get_megatron_optimizer``: it returns a ``ChainedOptimizer`` that Megatron's training loop
steps, zeroes, checkpoints and schedules as usual. Inside, one ``MARSM`` takes every
parameter: hidden matrices take the MARS-M update, embeddings, the output layer, norms and
biases the AdamW branch (Megatron's ``is_embedding_or_output_parameter`` marker decides, as
well as the names).

A tensor-parallel weight (``tensor_model_parallel=True``; at TP=1 Megatron still marks its
parallel linear layers and embeddings so) is one block of the full logical matrix along
``partition_dim`` (``partition_stride`` > 1, as in SwiGLU's fc1, interleaves blocks). It is
described over the whole tensor-and-data-parallel (TP x DP) group: every data-parallel (DP) rank
is a copy of its own holding its TP rank's block. Each matrix is then orthogonalized once in that
group: gathered from one DP copy's TP ranks to its owner, which runs Newton-Schulz on the full
matrix, scattered back to that copy and broadcast over the DP group to the other copies (which end
bitwise identical). Matrices Megatron does not mark (replicated over TP and DP, e.g. a MoE router)
are divided over the same group through ``MARSM(process_group=...)``. A fused QKV weight is one
matrix, as in the spec; ``split_qkv=True`` orthogonalizes the Q, K and V rows of every query group
as separate matrices instead (each TP rank holds whole query groups, so no exchange is needed, and
the result is the same with and without TP; every rank runs those itself). Expert-parallel (MoE)
weights differ between DP ranks: each rank orthogonalizes its own (expert TP size 1 only).

With ``use_distributed_optimizer=True`` MARS-M shards its own state over the data-parallel ranks
(:mod:`marsm_dist.adapters.megatron_sharded`), in place of Megatron's Adam-only one.
"""

from __future__ import annotations

import argparse
from typing import Any

try:
    from megatron.core import parallel_state
    from megatron.core.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
        OptimizerConfig,
        _get_param_groups,
    )
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
    from megatron.core.optimizer.optimizer import param_group_identifier_keys
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('marsm_dist.adapters.megatron needs megatron-core: pip install "marsm-dist[megatron]"'
                      ) from err

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..optimizer import MARSM
from ..param_groups import explain_routing
from ..sharding.adapter import ShardingAdapter, Slot, register_adapter
from ..sharding.layout import MatrixLayout, Piece

__all__ = ["MegatronTPAdapter", "add_marsm_args", "get_megatron_marsm_optimizer", "marsm_kwargs_from_args",
           "marsm_routes"]


class MegatronTPAdapter(ShardingAdapter):
    """Megatron's parameters held over the tensor-and-data-parallel group: tensor-parallel weights
    (one TP block per rank, one copy per DP rank) and expert-parallel ones (each rank's own)."""

    name = "megatron"
    prepopulate_state = False  # Megatron calls init_state_fn when it needs state templates

    def handles(self, p: Tensor) -> bool:
        return bool(getattr(p, "tensor_model_parallel", False)) or _expert_parallel(p)

    def process_group(self, p: Tensor) -> dist.ProcessGroup | None:
        return tensor_and_data_parallel_group()

    def replica_group(self, p: Tensor) -> dist.ProcessGroup | None:
        """The DP group: the ranks with this rank's TP rank, one per copy."""
        group = parallel_state.get_data_parallel_group()
        return group if dist.get_world_size(group) > 1 else None

    def layout(self, p: Tensor) -> MatrixLayout:
        group = tensor_and_data_parallel_group()
        if group is None:
            return super().layout(p)
        world = parallel_state.get_tensor_model_parallel_world_size()
        coords = _coordinates(group, p.device)
        dim, stride = p.partition_dim, tp_block_count(p)
        full = list(p.shape)
        full[dim] *= world
        numel = p.numel() // stride
        # TP rank t holds blocks t, W + t, 2W + t, ... of the full matrix cut in W * stride blocks.
        pieces = tuple(tuple(Piece(j * world + t, 0, numel) for j in range(stride)) for t, _ in coords)
        replicas = tuple(d for _, d in coords) if len({d for _, d in coords}) > 1 else None
        return MatrixLayout(tuple(full), pieces, split_dim=dim, num_blocks=world * stride, replicas=replicas)

    def slots(self, p: Tensor) -> list[Slot]:
        if _expert_parallel(p):
            # Each expert-parallel rank holds other experts: no copies to share the work with.
            if p.ndim >= 2 and parallel_state.get_expert_tensor_parallel_world_size() > 1:
                raise NotImplementedError("MARSM does not support expert tensor parallelism (an expert "
                                          "weight split over ranks) yet; use expert TP size 1")
            return [Slot(tuple(p.shape))]
        split = _QKV_SPLIT.get(p)
        if split is None:
            return super().slots(p)
        heads_per_group, head_dim = split
        cols = p.shape[1]
        rows = [heads_per_group * head_dim, head_dim, head_dim]  # Q, K, V of one query group
        groups = p.shape[0] // sum(rows)
        slots, row = [], 0
        for g in range(groups):
            for kind, n in zip("QKV", rows, strict=True):
                slots.append(Slot((n, cols), None, row * cols, n * cols, f"{kind} of local query group {g}"))
                row += n
        return slots


def _expert_parallel(p: Tensor) -> bool:
    """Megatron's mark of an expert-parallel (MoE) weight (not all-reduced over DP), or the fp32
    master copy of one (Megatron's ``Float16OptimizerWithFloat16Params`` does not copy the mark)."""
    return getattr(p, "allreduce", True) is False or p in _EXPERT_MAINS


_EXPERT_MAINS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def tensor_and_data_parallel_group() -> dist.ProcessGroup | None:
    """Megatron's TP x DP group, or None when it is this rank alone."""
    group = parallel_state.get_tensor_and_data_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


# id(group) -> (group, (tp rank, dp rank) of each of its ranks). The group is kept so its id is
# never reused by another group while the entry exists (Megatron's groups are rebuilt when its
# parallel state is destroyed and initialized again).
_COORDINATES: dict[int, tuple[dist.ProcessGroup, list[tuple[int, int]]]] = {}


def _coordinates(group: dist.ProcessGroup, device: torch.device) -> list[tuple[int, int]]:
    """(tp rank, dp rank) of every rank of ``group``, gathered once per group (a collective: the
    builder calls it on every rank; otherwise the first step's layouts do, on every rank too)."""
    entry = _COORDINATES.get(id(group))
    if entry is None or entry[0] is not group:
        from .megatron_sharded import _group_coordinates  # imports this module

        entry = _COORDINATES[id(group)] = (group, _group_coordinates(group, device))
    return entry[1]


def tp_block_count(p: Tensor) -> int:
    """How many blocks of the full matrix this TP rank's tensor holds (``partition_stride``)."""
    stride = getattr(p, "partition_stride", 1)
    if stride > 1 and p.partition_dim != 0:
        raise NotImplementedError(f"MARSM supports partition_stride > 1 only along dim 0; got stride "
                                  f"{stride} along dim {p.partition_dim} for a {tuple(p.shape)} shard")
    return stride


# Fused QKV weights to orthogonalize per query group -> (heads per group, head dim).
_QKV_SPLIT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _mark_qkv_split(model_chunks: list[torch.nn.Module]) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        cfg = getattr(chunk, "config", None) or chunk.module.config
        groups = cfg.num_query_groups or cfg.num_attention_heads
        if groups % tp:
            raise NotImplementedError(f"split_qkv needs num_query_groups ({groups}) divisible by the "
                                      f"tensor-parallel size ({tp}): a TP rank must hold whole groups")
        head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        for name, p in chunk.named_parameters():
            if name.endswith("linear_qkv.weight"):
                _QKV_SPLIT[p] = (cfg.num_attention_heads // groups, head_dim)


def marsm_routes(model_chunks: list[torch.nn.Module]) -> dict[int, bool]:
    """``id(param) -> True`` for the parameters MARS-M orthogonalizes, False for its AdamW branch.

    Megatron's ``is_embedding_or_output_parameter`` marker first, then ``param_groups``' rules.
    Public so that a baseline (e.g. Muon) can be given exactly the same matrices.
    """
    routes: dict[int, bool] = {}
    for chunk in model_chunks:
        params = dict(chunk.named_parameters())
        for d in explain_routing(chunk):
            p = params[d.name]
            routes[id(p)] = bool(d.use_marsm) and not getattr(p, "is_embedding_or_output_parameter", False)
    return routes


def get_megatron_marsm_optimizer(
    config: OptimizerConfig,
    model_chunks: list[torch.nn.Module],
    config_overrides: Any = None,
    use_gloo_process_groups: bool = True,
    pg_collection: Any = None,
    dump_param_to_param_group_map: str | None = None,
    *,
    split_qkv: bool = False,
    **marsm_kwargs: Any,
) -> ChainedOptimizer:
    """A drop-in for ``megatron.core.optimizer.get_megatron_optimizer`` that builds MARS-M.

    Megatron's parameter groups (``wd_mult``, ``lr_mult``, ``max_lr``, ...) are kept; each is
    split into its MARS-M and AdamW parts. ``config.lr``, ``weight_decay``, ``adam_beta1/2``
    and ``adam_eps`` set the shared hyperparameters; ``marsm_kwargs`` go to :class:`MARSM`
    (e.g. ``gamma``, ``momentum``, ``ns_steps``, ``ns_dtype``, ``owner_policy``). Exact mode
    (``approx=False``) is refused: Megatron's loop does not run the look-ahead backward.
    ``split_qkv`` orthogonalizes each query group's Q, K and V separately (see the module doc).

    With ``config.use_distributed_optimizer`` (the model wrapped in Megatron's DDP with
    ``use_distributed_optimizer=True`` too) the optimizer state is sharded over the data-parallel
    ranks: see :mod:`marsm_dist.adapters.megatron_sharded`. Otherwise every data-parallel rank
    keeps the whole state, and ``config.fp16``/``bf16`` keep fp32 master weights as Megatron's
    ``Float16OptimizerWithFloat16Params`` does; Newton-Schulz still runs once per matrix in the
    tensor-and-data-parallel group (``MARSM``'s ``process_group`` is that group unless
    ``marsm_kwargs`` give another), not once per data-parallel replica.
    """
    del use_gloo_process_groups, pg_collection  # accepted for signature compatibility
    if dump_param_to_param_group_map is not None:
        raise NotImplementedError("dump_param_to_param_group_map is not supported by MARSM's builder")
    distributed = bool(getattr(config, "use_distributed_optimizer", False))
    if marsm_kwargs.get("approx", True) is False:
        raise NotImplementedError("MARSM's exact mode (approx=False) needs a second backward pass per step "
                                  "(the next batch at the current weights, then store_lookahead_grad()), "
                                  "which Megatron's training loop does not run; use approx=True (default)")
    if split_qkv and distributed:
        raise NotImplementedError("split_qkv is not supported with use_distributed_optimizer yet")
    if split_qkv:
        _mark_qkv_split(model_chunks)
    routes = marsm_routes(model_chunks)
    groups = []
    for group in _get_param_groups(model_chunks, config, config_overrides):
        for use in (True, False):
            chosen = [p for p in group["params"] if routes.get(id(p), p.ndim >= 2) is use]
            if chosen:
                groups.append({**group, "params": chosen, "use_marsm": use})
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay,
                  adamw_betas=(config.adam_beta1, config.adam_beta2), adamw_eps=config.adam_eps)
    kwargs.update(marsm_kwargs)

    def init_state_fn(opt: MARSM, config: Any = None) -> None:
        opt.init_state()

    scaler = _grad_scaler(config)
    if distributed:
        from .megatron_sharded import ShardedMARSMOptimizer

        return ChainedOptimizer([ShardedMARSMOptimizer(config, model_chunks, groups, kwargs, scaler,
                                                       init_state_fn)])
    # Every matrix once in the TP x DP group: tensor-parallel ones through the adapter's layouts,
    # the others (replicated over TP and DP) as MARSM's replicated parameters.
    group = tensor_and_data_parallel_group()
    if group is not None:
        _coordinates(group, _device_of(model_chunks))  # now, on every rank: a collective
    optimizer = MARSM(groups, **{"process_group": group, **kwargs})
    if config.fp16 or config.bf16:
        wrapped = _Float16MARSM(optimizer, config, scaler, init_state_fn)
        for params, mains in zip(wrapped.float16_groups, wrapped.fp32_from_float16_groups, strict=True):
            _EXPERT_MAINS.update({m: True for p, m in zip(params, mains, strict=True) if _expert_parallel(p)})
    else:
        wrapped = _FP32MARSM(optimizer, config, init_state_fn)
    return ChainedOptimizer([wrapped])


def _device_of(model_chunks: list[torch.nn.Module]) -> torch.device:
    """Where the model's parameters (so the optimizer's tensors and its collectives) live."""
    for p in (p for chunk in model_chunks for p in chunk.parameters()):
        return p.device
    raise ValueError("get_megatron_marsm_optimizer: the model chunks have no parameters")


def _grad_scaler(config: OptimizerConfig) -> ConstantGradScaler | DynamicGradScaler | None:
    """The loss scaler Megatron's own builder makes for this config (None for bf16/fp32)."""
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                                 growth_factor=2.0, backoff_factor=0.5,
                                 growth_interval=config.loss_scale_window, hysteresis=config.hysteresis)
    return None


def match_param_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved param groups in the current optimizer's order.

    Megatron matches groups by ``param_group_identifier_keys``; every Megatron group is split
    here into a MARS-M and an AdamW part with the same keys, so ``use_marsm`` joins the match.
    The ``params`` lists stay in place: they are the current run's (restored at load time).
    """
    def key(g: dict[str, Any]) -> tuple:
        return tuple(g.get(k, g.get(f"pre_{k}")) for k in param_group_identifier_keys) + (g["use_marsm"],)

    by_key = {key(g): g for g in saved}
    out = []
    for cur, params in zip(current, [g["params"] for g in saved], strict=True):
        if key(cur) not in by_key:
            raise ValueError(f"the checkpoint has no parameter group {key(cur)}; it has {list(by_key)}")
        out.append({**by_key[key(cur)], "params": params})
    return out


class _FP32MARSM(FP32Optimizer):
    """Megatron's FP32Optimizer; saved groups are matched with :func:`match_param_groups`."""

    _filter_and_reorder_param_groups = staticmethod(match_param_groups)


class _Float16MARSM(Float16OptimizerWithFloat16Params):
    """Megatron's Float16OptimizerWithFloat16Params, groups matched as in :class:`_FP32MARSM`."""

    _filter_and_reorder_param_groups = staticmethod(match_param_groups)


def add_marsm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--marsm-*`` flags for Megatron-LM's ``extra_args_provider`` (mirroring ``--muon-*``)."""
    g = parser.add_argument_group("MARS-M")
    g.add_argument("--marsm-momentum", type=float, default=0.95)
    g.add_argument("--marsm-gamma", type=float, default=0.025)
    g.add_argument("--marsm-ns-steps", type=int, default=5)
    g.add_argument("--marsm-ns-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--marsm-owner-policy", choices=["balanced", "round_robin"], default="balanced")
    g.add_argument("--marsm-split-qkv", action="store_true",
                   help="orthogonalize Q, K, V of each query group separately")
    return parser


def marsm_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The MARSM keyword arguments that :func:`add_marsm_args`'s flags select."""
    return dict(momentum=args.marsm_momentum, gamma=args.marsm_gamma, ns_steps=args.marsm_ns_steps,
                ns_dtype=args.marsm_ns_dtype,
                owner_policy=args.marsm_owner_policy, split_qkv=args.marsm_split_qkv)


register_adapter(MegatronTPAdapter())
