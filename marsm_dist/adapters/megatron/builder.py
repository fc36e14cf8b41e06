"""``get_megatron_marsm_optimizer``: the one place that chooses Megatron's optimizer wrapper for MARS-M.

Three wrappers, each a small Megatron class: :class:`~.sharded.ShardedMARSMOptimizer` with the
distributed optimizer, else Megatron's ``Float16OptimizerWithFloat16Params`` (fp16/bf16: fp32
master weights) or ``FP32Optimizer``, both with saved groups matched by
:func:`~.routing.match_param_groups`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
)
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler

from ...checkpoint.held import register_inner, register_master_sync, register_param_aliases
from ...optimizer import MARSM
from .._common import refuse_exact_mode
from .routing import marsm_param_groups, match_param_groups
from .sharded import ShardedMARSMOptimizer
from .tp_adapter import mark_experts, mark_mains, mark_qkv_split
from .tp_adapter import register as register_tp_adapter
from .tp_layout import job_group, rank_coordinates

__all__ = ["get_megatron_marsm_optimizer"]

_EXACT_MODE = ("MARSM's exact mode (approx=False) needs a second backward pass per step "
               "(the next batch at the current weights, then store_lookahead_grad()), "
               "which Megatron's training loop does not run; use approx=True (default)")


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
    ``split_qkv`` orthogonalizes each query group's Q, K and V separately (see the package doc).

    With ``config.use_distributed_optimizer`` (the model wrapped in Megatron's DDP with
    ``use_distributed_optimizer=True`` too) the optimizer state is sharded over the data-parallel
    ranks: see :mod:`marsm_dist.adapters.megatron.sharded`. Otherwise every data-parallel rank
    keeps the whole state, and ``config.fp16``/``bf16`` keep fp32 master weights as Megatron's
    ``Float16OptimizerWithFloat16Params`` does; Newton-Schulz still runs once per matrix in the
    tensor-and-data(-and-context)-parallel group (``MARSM``'s ``process_group`` is that group unless
    ``marsm_kwargs`` give another), not once per data- or context-parallel replica, and once per
    global expert of a MoE layer (expert, expert-tensor and expert-data parallelism), not once per
    expert-data-parallel replica.
    """
    del use_gloo_process_groups, pg_collection  # accepted for signature compatibility
    if dump_param_to_param_group_map is not None:
        raise NotImplementedError("dump_param_to_param_group_map is not supported by MARSM's builder")
    distributed = bool(getattr(config, "use_distributed_optimizer", False))
    refuse_exact_mode([marsm_kwargs.get("approx", True)], _EXACT_MODE)
    if split_qkv and distributed:
        raise NotImplementedError("split_qkv is not supported with use_distributed_optimizer yet")
    register_tp_adapter()  # Megatron's tensors, and the marks set below
    register_master_sync(_copy_mains_to_model)  # for load_neutral(weights=True)
    register_param_aliases(_mains_of)  # the neutral form names the fp32 mains as their parameters
    register_inner(_only_chained)
    if split_qkv:
        mark_qkv_split(model_chunks)
    groups = marsm_param_groups(model_chunks, config, config_overrides)
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay,
                  adamw_betas=(config.adam_beta1, config.adam_beta2), adamw_eps=config.adam_eps)
    kwargs.update(marsm_kwargs)

    def init_state_fn(opt: MARSM, config: Any = None) -> None:
        opt.init_state()

    build = ShardedMARSMOptimizer if distributed else _replicated  # the one choice of wrapper
    scaler = _grad_scaler(config)
    return ChainedOptimizer([build(config, model_chunks, groups, kwargs, scaler, init_state_fn)])


def _copy_mains_to_model(wrapper: Any) -> Callable[[], None] | None:
    """A Megatron mixed-precision wrapper around MARSM: its fp32 mains -> the model's bf16/fp16."""
    if isinstance(getattr(wrapper, "optimizer", None), MARSM) and hasattr(
            wrapper, "_copy_main_params_to_model_params"):
        return wrapper._copy_main_params_to_model_params
    return None


def _only_chained(wrapper: Any) -> Any:
    """The one optimizer a ChainedOptimizer holds (its ``.optimizer`` skips to MARSM itself)."""
    chained = getattr(wrapper, "chained_optimizers", None)
    return chained[0] if isinstance(wrapper, ChainedOptimizer) and len(chained) == 1 else None


def _mains_of(wrapper: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Megatron's fp16/bf16 wrapper around MARSM: (fp32 main, model parameter) pairs."""
    if not (isinstance(getattr(wrapper, "optimizer", None), MARSM) and hasattr(wrapper, "float16_groups")):
        return None
    groups = zip(wrapper.float16_groups, wrapper.fp32_from_float16_groups, strict=True)
    return [(main, param) for params, mains in groups for param, main in zip(params, mains, strict=True)]


def _replicated(config: OptimizerConfig, model_chunks: list[torch.nn.Module], groups: list[dict[str, Any]],
                kwargs: dict[str, Any], scaler: MegatronGradScaler | None, init_state_fn: Callable
                ) -> FP32Optimizer | Float16OptimizerWithFloat16Params:
    """Every DP rank keeps the whole state; Megatron's fp32 or fp16/bf16 wrapper around one MARSM."""
    # Every matrix once in the TP x DP (x CP) group: tensor-parallel and expert ones through the
    # adapter's layouts, the others (replicated over TP, DP and CP) as MARSM's replicated parameters.
    group = job_group()
    if group is not None:
        rank_coordinates(group, _device_of(model_chunks))  # now, on every rank: a collective
    mark_experts(model_chunks, groups)
    optimizer = MARSM(groups, **{"process_group": group, **kwargs})
    if not (config.fp16 or config.bf16):
        return _FP32MARSM(optimizer, config, init_state_fn)
    wrapped = _Float16MARSM(optimizer, config, scaler, init_state_fn)
    for params, mains in zip(wrapped.float16_groups, wrapped.fp32_from_float16_groups, strict=True):
        mark_mains(params, mains)
    return wrapped


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


class _FP32MARSM(FP32Optimizer):
    """Megatron's FP32Optimizer; saved groups are matched with :func:`match_param_groups`."""

    _filter_and_reorder_param_groups = staticmethod(match_param_groups)


class _Float16MARSM(Float16OptimizerWithFloat16Params):
    """Megatron's Float16OptimizerWithFloat16Params, groups matched as in :class:`_FP32MARSM`."""

    _filter_and_reorder_param_groups = staticmethod(match_param_groups)
