"""Which of Megatron's parameters MARS-M takes, its groups split by that, and saved groups matched back."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.optimizer import OptimizerConfig, _get_param_groups
from megatron.core.optimizer.optimizer import param_group_identifier_keys

from ...param_groups import param_decisions, split_by_route, takes_marsm

__all__ = ["marsm_param_groups", "marsm_routes", "match_param_groups"]


def marsm_routes(model_chunks: list[torch.nn.Module]) -> dict[int, bool]:
    """``id(param) -> True`` for the parameters MARS-M orthogonalizes, False for its AdamW branch.

    Megatron's ``is_embedding_or_output_parameter`` marker first, then ``param_groups``' rules.
    Public so that a baseline (e.g. Muon) can be given exactly the same matrices.
    """
    routes: dict[int, bool] = {}
    for chunk in model_chunks:
        for p, d in param_decisions(chunk):
            routes[id(p)] = bool(d.use_marsm) and not getattr(p, "is_embedding_or_output_parameter", False)
    return routes


def marsm_param_groups(model_chunks: list[torch.nn.Module], config: OptimizerConfig,
                       config_overrides: Any = None) -> list[dict[str, Any]]:
    """Megatron's parameter groups (``wd_mult``, ``lr_mult``, ``max_lr``, ...), each split into its
    MARS-M and AdamW parts by :func:`marsm_routes` (a parameter it does not know: >= 2 dims).

    Megatron's expert-parallel groups (``is_expert_parallel``: MoE expert weights, each EP rank
    holding other experts) get ``experts=True``: the adapter describes each such tensor as the
    ``(EP, *expert)`` stack of that local expert over the EP ranks, and MARSM splits dim 0 into
    one matrix per global expert (a per-expert bias, ``(EP, n)``, goes to AdamW)."""
    routes = marsm_routes(model_chunks)
    groups = []
    for group in _get_param_groups(model_chunks, config, config_overrides):
        experts = {"experts": True} if group.get("is_expert_parallel") else {}
        parts = split_by_route(group, lambda p: routes.get(id(p), takes_marsm(None, p.shape)))
        groups += [{**part, **experts} for part in parts]
    return groups


def match_param_groups(current: list[dict[str, Any]], saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved param groups in the current optimizer's order.

    Megatron matches groups by ``param_group_identifier_keys``; every Megatron group is split
    here into a MARS-M and an AdamW part with the same keys, so ``use_marsm`` joins the match.
    The ``params`` lists stay in place: they are the current run's (restored at load time), and so
    does ``experts`` (how this run describes its tensors, not a hyperparameter; older checkpoints
    lack it).
    """
    def key(g: dict[str, Any]) -> tuple:
        return tuple(g.get(k, g.get(f"pre_{k}")) for k in param_group_identifier_keys) + (g["use_marsm"],)

    by_key = {key(g): g for g in saved}
    out = []
    for cur, params in zip(current, [g["params"] for g in saved], strict=True):
        if key(cur) not in by_key:
            raise ValueError(f"the checkpoint has no parameter group {key(cur)}; it has {list(by_key)}")
        experts = {"experts": cur["experts"]} if "experts" in cur else {}
        out.append({**by_key[key(cur)], "params": params, **experts})
    return out
