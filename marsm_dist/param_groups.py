"""Split a model's parameters into the MARS-M (matrix) set and the AdamW set (docs/algorithm.md section 2).

Hidden weights with at least 2 dims go to MARS-M. Biases, norm gains and other 0-D/1-D tensors go
to AdamW, and so do embeddings and the output head although they are 2-D: the paper's recipes
treat them that way. A head tied to the embedding is one tensor and goes to AdamW with it.

Mixture-of-experts layers: a tensor that stacks the experts' weights along dim 0 (torchtitan's
``GroupedExperts`` ``w1/w2/w3``, HF transformers' ``*Experts`` ``gate_up_proj``/``down_proj``) goes
to MARS-M in a group with ``experts=True``: each expert is its own matrix. A fused gate/up tensor
stays one matrix per expert, ``(2F, D)``, as a fused QKV stays one matrix: MARS-M orthogonalizes
the tensor a layer holds, and splitting it is a different algorithm. Per-expert biases (``(E, n)``)
go to AdamW. The router (the layer's ``(E, D)`` gate) goes to AdamW: like the output head it
produces logits, here over experts, whose scale sets how sharply tokens are routed and how the
load balances; an orthogonalized update of fixed RMS would move that scale by the update's
schedule, not the loss's, and the tensor is tiny. Megatron's legacy ``GroupedMLP`` (all local
experts side by side in one 2-D ``weight1``/``weight2``) cannot be described per expert as one run
of memory per expert and is refused rather than orthogonalized as one matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import Tensor, nn

from .functional import takes_marsm

__all__ = ["DEFAULT_HEAD_NAMES", "ROUTER_NAMES", "RoutingDecision", "explain_routing", "param_decisions",
           "param_groups", "routing_report", "split_by_route", "split_experts", "takes_marsm"]

logger = logging.getLogger(__name__)

# Module names that mark an output head anywhere in a parameter's name ...
DEFAULT_HEAD_NAMES: tuple[str, ...] = ("lm_head", "output_layer", "unembed", "unembedding", "classifier")
# ... and names that mark one only as a top-level module ("output.weight" in Llama-style models,
# while "encoder.layer.0.attention.output.dense" in BERT is a hidden matrix).
_TOP_LEVEL_HEAD_NAMES = ("output", "head")
_EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)
# Module names (anywhere in a parameter's name) that mark a MoE router: Megatron's and HF's
# ``router``, HF Mixtral/Qwen-MoE's ``gate``, DeepSpeed's ``gate.wg``, Qwen's ``shared_expert_gate``.
ROUTER_NAMES: tuple[str, ...] = ("router", "gate", "shared_expert_gate")


def _is_experts_module(module: nn.Module) -> bool:
    """A module holding all its experts' weights stacked along dim 0 (torchtitan's
    ``GroupedExperts``, HF transformers' ``Qwen3MoeExperts``, ``MixtralExperts``, ``GptOssExperts``...)."""
    return type(module).__name__.endswith("Experts")


def _is_router_module(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Router") or name in ("TopKGate", "TopkGate")


@dataclass(frozen=True)
class RoutingDecision:
    """Where one parameter goes and why.

    Attributes:
        name: qualified name (the first one when the tensor is registered under several).
        shape: the parameter's shape.
        use_marsm: True for the MARS-M branch, False for AdamW, None when it is not optimized.
        reason: a short human-readable justification.
        experts: dim 0 indexes independent matrices (MoE experts): it goes to a group with
            ``experts=True``.
    """

    name: str
    shape: tuple[int, ...]
    use_marsm: bool | None
    reason: str
    experts: bool = False


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pat) for pat in patterns)


def _is_embedding_name(name: str) -> bool:
    return any("embed" in part.lower() or part in ("wte", "wpe") for part in name.split("."))


def _is_head_name(name: str, head_names: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(part in head_names for part in parts) or (
        len(parts) == 2 and parts[0] in _TOP_LEVEL_HEAD_NAMES
    )


def explain_routing(
    model: nn.Module,
    *,
    marsm: Iterable[str] = (),
    adamw: Iterable[str] = (),
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    shape_of: Callable[[Tensor], tuple[int, ...]] | None = None,
    experts: Iterable[str] = (),
) -> list[RoutingDecision]:
    """Decide, for every parameter of ``model``, which branch takes it and why.

    Args:
        model: the module whose parameters to route.
        marsm: glob patterns of parameter names forced to MARS-M (they must have >= 2 dims).
        adamw: glob patterns of parameter names forced to AdamW; they win over ``marsm``.
        head_names: module names that mark an output head.
        shape_of: the real shape of a parameter, where a framework stores it elsewhere (under
            DeepSpeed ZeRO-3 a parameter is a flat placeholder; adapters pass this).
        experts: glob patterns of parameter names whose dim 0 indexes experts, for expert
            modules not recognized by their class (``*Experts``).
    """
    marsm, adamw, head_names, experts = tuple(marsm), tuple(adamw), tuple(head_names), tuple(experts)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    embedding_params = {
        id(p): type(m).__name__
        for m in model.modules() if isinstance(m, _EMBEDDING_MODULES)
        for p in m.parameters(recurse=False)
    }
    owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    decisions = []
    for name, p in model.named_parameters():
        aliases = names[id(p)]
        shape = tuple(shape_of(p) if shape_of is not None else p.shape)
        ndim = len(shape)
        tied = f" (tied: {', '.join(aliases[1:])})" if len(aliases) > 1 else ""
        module = owner[id(p)]
        stacked = ndim >= 2 and (_is_experts_module(module) or any(_matches(a, experts) for a in aliases))
        router = ndim >= 2 and (_is_router_module(module) or any(
            part in ROUTER_NAMES for a in aliases for part in a.split(".")[:-1]))
        if not p.requires_grad:
            use, why = None, "frozen (requires_grad=False): not optimized"
        elif any(_matches(a, adamw) for a in aliases):
            use, why = False, "forced to AdamW by the adamw= patterns"
        elif any(_matches(a, marsm) for a in aliases):
            if ndim < 2:
                raise ValueError(f"marsm= pattern matches {name!r} of shape {shape}; MARS-M "
                                 "needs at least 2 dims")
            use, why = True, "forced to MARS-M by the marsm= patterns"
            if stacked and ndim < 3:
                raise ValueError(f"marsm= pattern matches {name!r} of shape {shape}, a per-expert "
                                 "tensor of 1-D experts; MARS-M needs a matrix per expert")
        else:
            use, why = _by_kind(name, shape, module, aliases, stacked, router, embedding_params.get(id(p)),
                                head_names, tied)
        decisions.append(RoutingDecision(name, shape, use, why, bool(use) and stacked and ndim >= 3))
    return decisions


def _by_kind(name: str, shape: tuple[int, ...], module: nn.Module, aliases: list[str], stacked: bool,
             router: bool, embedding: str | None, head_names: tuple[str, ...], tied: str) -> tuple[bool, str]:
    """The branch of a parameter no pattern forced, by what it is (its module, shape and names)."""
    ndim = len(shape)
    if stacked and ndim >= 3:
        return True, f"MoE experts: {shape[0]} matrices of {shape[1:]}, each its own"
    if stacked:
        return False, f"per-expert bias ({shape[0]} experts of {shape[1:]})"
    if router:
        return False, "MoE router (logits over experts, like an output head)"
    if type(module).__name__ == "GroupedMLP" and ndim == 2:
        raise ValueError(
            f"{name!r} of shape {shape} is a weight of Megatron's legacy GroupedMLP: all local "
            "experts side by side in one matrix, which MARS-M cannot split per expert (its "
            "experts are not separate runs of memory). Use SequentialMLP or TEGroupedMLP "
            "(--moe-grouped-gemm with TransformerEngine), or route it to AdamW with adamw=[...]")
    if ndim < 2:
        return False, f"{ndim}-D (bias, norm gain or scalar)"
    if embedding is not None:
        return False, f"embedding ({embedding}){tied}"
    if any(_is_embedding_name(a) for a in aliases):
        return False, f"name marks an embedding{tied}"
    if any(_is_head_name(a, head_names) for a in aliases):
        return False, f"output head{tied}"
    return True, f"hidden matrix ({ndim}-D)"


def routing_report(decisions: list[RoutingDecision]) -> str:
    """Format decisions as a table: one line per parameter, then the totals per branch."""
    width = max((len(d.name) for d in decisions), default=4)
    branch = {True: "MARS-M", False: "AdamW", None: "-"}
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'branch':<8} reason"]
    for d in decisions:
        label = "MARS-M/E" if d.experts else branch[d.use_marsm]
        lines.append(f"{d.name:<{width}}  {str(d.shape):<18} {label:<8} {d.reason}")
    for use in (True, False):
        chosen = [d for d in decisions if d.use_marsm is use]
        numel = sum(_numel(d.shape) for d in chosen)
        lines.append(f"{branch[use]}: {len(chosen)} tensors, {numel:,} elements")
    stacked = [d for d in decisions if d.experts]
    if stacked:
        lines.append(f"MARS-M/E (experts=True, each expert its own matrix): {len(stacked)} tensors, "
                     f"{sum(d.shape[0] for d in stacked):,} expert matrices")
    return "\n".join(lines)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def param_groups(
    model: nn.Module,
    *,
    marsm: Iterable[str] = (),
    adamw: Iterable[str] = (),
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    marsm_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
    named: bool = True,
    report: bool = False,
    shape_of: Callable[[Tensor], tuple[int, ...]] | None = None,
    experts: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Build MARSM's param groups for ``model``: ``use_marsm=True`` and ``use_marsm=False``.

    Args:
        model: the module to optimize (frozen parameters are left out).
        marsm, adamw, head_names: routing overrides, see :func:`explain_routing`.
        marsm_options, adamw_options: extra hyperparameters for each group (e.g. ``{"lr": 3e-4}``).
        named: give ``(name, param)`` pairs so the optimizer knows names (error messages,
            ``param_names`` in its state dict).
        report: print the routing table (it is always logged at DEBUG level).
        shape_of, experts: see :func:`explain_routing`.

    Returns:
        A list of at most three group dicts, ready for ``MARSM(groups, ...)``: the matrices
        (``use_marsm=True``), the stacked MoE experts (``use_marsm=True, experts=True``, both with
        ``marsm_options``) and the rest (``use_marsm=False``); empty groups are left out.
    """
    decisions = explain_routing(model, marsm=marsm, adamw=adamw, head_names=head_names,
                                shape_of=shape_of, experts=experts)
    text = routing_report(decisions)
    logger.debug("MARS-M parameter routing:\n%s", text)
    if report:
        print(text)
    params = dict(model.named_parameters())
    use_of = {id(params[d.name]): d.use_marsm for d in decisions}
    stacked = {id(params[d.name]) for d in decisions if d.experts}
    items = [(n, p) if named else p for n, p in params.items()]
    groups = split_by_route({"params": items}, lambda item: use_of[id(item[1] if named else item)],
                            {True: marsm_options, False: adamw_options})
    return split_experts(groups, lambda item: id(item[1] if named else item) in stacked)


def split_experts(groups: list[dict[str, Any]], is_stacked: Callable[[Any], bool]) -> list[dict[str, Any]]:
    """Each ``use_marsm=True`` group that holds stacked MoE expert tensors (``is_stacked(item)``)
    cut in two: the other matrices, then the experts with ``experts=True``; other groups as given."""
    out = []
    for group in groups:
        if not group.get("use_marsm") or "experts" in group:
            out.append(group)
            continue
        for stacked in (False, True):
            chosen = [item for item in group["params"] if is_stacked(item) is stacked]
            if chosen:
                out.append({**group, "params": chosen, **({"experts": True} if stacked else {})})
    return out


def param_decisions(model: nn.Module, *, shape_of: Callable[[Tensor], tuple[int, ...]] | None = None
                    ) -> list[tuple[Tensor, RoutingDecision]]:
    """Every parameter of ``model`` with its :func:`explain_routing` decision, in the model's order.

    What an adapter builds its route map from (``{id(p): decision}``) when a framework hands it
    bare tensors, not names.
    """
    params = dict(model.named_parameters())
    return [(params[d.name], d) for d in explain_routing(model, shape_of=shape_of)]


def split_by_route(group: Mapping[str, Any], route: Callable[[Any], bool | None],
                   options: Mapping[bool, Mapping[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """``group`` cut into its MARS-M part and its AdamW part: ``use_marsm=True`` first, then False.

    ``route(item)`` says where each item of ``group["params"]`` goes: True, False, or None to leave
    it out (a frozen parameter). Both parts keep ``group``'s other keys, then add
    ``options[use_marsm]``; an empty part is left out.
    """
    options = options or {}
    parts = []
    for use in (True, False):
        chosen = [item for item in group["params"] if route(item) is use]
        if chosen:
            parts.append({**group, "params": chosen, "use_marsm": use, **dict(options.get(use) or {})})
    return parts
