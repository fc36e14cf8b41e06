"""The neutral form of MARS-M's state: a DCP checkpoint keyed by parameter name.

``state.<name>.<key>`` holds the full tensor of state ``key`` (``exp_avg``, ``last_grad``,
``exp_avg_sq``, ``lookahead_grad``) of parameter ``<name>``, in the parameter's own shape, as
``torch.distributed.checkpoint.state_dict`` names a model's optimizer state; ``marsm_state.json``
holds the step counters, each parameter's branch and the hyperparameters. Every rank writes only
the elements it holds (its boxes of each tensor; replicas once), and on load every rank reads only
its own: no rank ever gathers a full tensor, whatever the sharding on either side. So a run saved
under one framework and shape loads under any other (see ``docs/checkpoints.md``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..optimizer import MARSM
from ..sharding.adapter import adapter_for
from .held import (
    BRANCH_KEYS,
    HeldTensor,
    NameMap,
    held_tensors,
    marsm_in,
    names_from_model,
    names_through_wrappers,
)
from .manifest import FORMAT, VERSION, jsonable, write_manifest
from .planners import BoxedTensor, BoxSavePlanner

__all__ = ["WEIGHTS_KEY", "save_neutral", "state_key"]

#: The key of a parameter's master weights (``save_neutral(weights=True)``).
WEIGHTS_KEY = "param"


def state_key(name: str, key: str) -> str:
    """The DCP key of state ``key`` of parameter ``name``."""
    return f"state.{name}.{key}"


def names_for(model: Any, names: Mapping[int, str] | None) -> Mapping[int, str] | None:
    if model is not None:
        return names_from_model(model)
    return names


def hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return jsonable({k: v for k, v in group.items() if k not in ("params", "param_names")})


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def weights_key(name: str) -> str:
    """The DCP key of parameter ``name``'s master weights."""
    return f"{WEIGHTS_KEY}.{name}"


def _describe(opt: MARSM, held: list[HeldTensor], weights: bool
              ) -> tuple[dict[str, BoxedTensor], dict[str, Any], list[str]]:
    """This rank's tensors to write and its part of the manifest."""
    tensors: dict[str, BoxedTensor] = {}
    params: dict[str, Any] = {}
    problems = []
    for h in held:
        group = opt.param_groups[h.group_index]
        state = opt._ensure_state(group, h.container)
        keys = [k for k in BRANCH_KEYS[h.branch] if k in state]
        entry = dict(shape=list(h.shape), branch=h.branch, step=float(state["step"]), keys=keys,
                     hyperparameters=hyperparameters(group), adapter=adapter_for(h.container).name)
        if "lookahead_ready" in state:
            entry["lookahead_ready"] = bool(state["lookahead_ready"])
        if h.name in params:  # e.g. Megatron's split_qkv slots, named per local query group
            problems.append(f"two parameters are named {h.name!r} (shapes {params[h.name]['shape']} and "
                            f"{entry['shape']}): give name_map= to tell them apart")
        params[h.name] = entry
        for key in keys:
            tensors[state_key(h.name, key)] = BoxedTensor(h.shape, h.boxes, h.local(state[key]))
        if weights:  # the optimizer's own parameter: the fp32 master where the framework keeps one
            tensors[weights_key(h.name)] = BoxedTensor(h.shape, h.boxes, h.local(h.container))
    return tensors, params, problems


def _merge(fragments: list[tuple[dict[str, Any], list[str]]]) -> tuple[dict[str, Any], list[str]]:
    params: dict[str, Any] = {}
    problems = [p for _, probs in fragments for p in probs]
    for rank, (fragment, _) in enumerate(fragments):
        for name, entry in fragment.items():
            seen = params.setdefault(name, entry)
            differ = [k for k in ("shape", "branch", "step", "keys") if seen[k] != entry[k]]
            if differ:
                was, now = [seen[k] for k in differ], [entry[k] for k in differ]
                problems.append(f"ranks disagree on {name!r} ({', '.join(differ)}: {was} vs {now} "
                                f"on rank {rank})")
    return params, problems


def save_neutral(optimizer: Any, path: str | os.PathLike, *, model: Any = None,
                 names: Mapping[int, str] | None = None, name_map: NameMap | None = None,
                 framework: str | None = None, weights: bool = False,
                 process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Export MARS-M's state to ``path`` in the neutral form (collective: call it on every rank).

    Args:
        optimizer: the ``MARSM``, or what wraps it (a DeepSpeed engine, an Accelerate optimizer).
        path: a directory (created); a shared file system when ranks are on several hosts.
        model: the model, for parameter names when the optimizer has none (``module.`` and
            ``_orig_mod.`` prefixes are dropped, so DDP and compiled models name as the plain one).
        names: parameter id -> name, instead of ``model``.
        name_map: renames each parameter (return None to leave it out), e.g. Megatron's names to
            the Hugging Face ones another framework will load under.
        framework: a label recorded as the writer (default: the sharding adapters' names).
        weights: also write the parameters the optimizer steps, as ``param.<name>``: the fp32
            master weights under mixed precision (DeepSpeed, Megatron), which the model's bf16
            weights would round; ``load_neutral(weights=True)`` restores them.
        process_group: the group that saves together (default: every rank).

    Returns the manifest. Nothing is written when the ranks disagree (a ValueError says why).
    """
    with marsm_in(optimizer) as opt:
        held = held_tensors(opt, names_through_wrappers(optimizer, names_for(model, names)), name_map)
        return _save(opt, path, held, framework, weights, process_group)


def _save(opt: MARSM, path: str | os.PathLike, held: list[HeldTensor], framework: str | None, weights: bool,
          process_group: dist.ProcessGroup | None) -> dict[str, Any]:
    tensors, params, problems = _describe(opt, held, weights)
    params, problems = _merge(gather((params, problems), process_group))
    if problems:
        raise ValueError("save_neutral: nothing written: " + "; ".join(problems[:10]))
    groups: list[dict[str, Any]] = []
    for entry in params.values():
        hyper = entry.pop("hyperparameters")
        if hyper not in groups:
            groups.append(hyper)
        entry["group"] = groups.index(hyper)
    adapters = sorted({e.pop("adapter") for e in params.values()})
    start = time.perf_counter()
    with warnings.catch_warnings():  # DCP's "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, checkpoint_id=path, planner=BoxSavePlanner(tensors), process_group=process_group,
                 no_dist=not distributed())
    world = dist.get_world_size(process_group) if distributed() else 1
    manifest = dict(format=FORMAT, version=VERSION, written_by=framework or "+".join(adapters),
                    weights=weights,
                    world_size=world, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    torch=torch.__version__, groups=groups, params=params,
                    seconds=round(time.perf_counter() - start, 3))
    if not distributed() or dist.get_rank(process_group) == 0:
        write_manifest(path, manifest)
    if distributed():
        dist.barrier(process_group)  # every rank returns once the checkpoint is complete
    return manifest
