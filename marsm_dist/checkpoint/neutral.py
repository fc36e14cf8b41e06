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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..optimizer import MARSM
from ..options import AGREED_KEYS
from ..sharding.adapter import adapter_for
from .held import BRANCH_KEYS, HeldTensor, NameMap, held_tensors, marsm_in, names_from_model
from .manifest import FORMAT, VERSION, jsonable, read_manifest, write_manifest
from .planners import BoxedTensor, BoxLoadPlanner, BoxSavePlanner

__all__ = ["load_neutral", "save_neutral", "state_key"]

# Schedulers move lr; the branch is checked per parameter (a use_marsm of None routes by shape).
_NOT_COMPARED = {"lr", "initial_lr", "use_marsm", "experts"}


def state_key(name: str, key: str) -> str:
    """The DCP key of state ``key`` of parameter ``name``."""
    return f"state.{name}.{key}"


def _names(model: Any, names: Mapping[int, str] | None) -> Mapping[int, str] | None:
    if model is not None:
        return names_from_model(model)
    return names


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return jsonable({k: v for k, v in group.items() if k not in ("params", "param_names")})


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not _distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _describe(opt: MARSM, held: list[HeldTensor]) -> tuple[dict[str, BoxedTensor], dict[str, Any], list[str]]:
    """This rank's tensors to write and its part of the manifest."""
    tensors: dict[str, BoxedTensor] = {}
    params: dict[str, Any] = {}
    problems = []
    for h in held:
        group = opt.param_groups[h.group_index]
        state = opt._ensure_state(group, h.container)
        keys = [k for k in BRANCH_KEYS[h.branch] if k in state]
        entry = dict(shape=list(h.shape), branch=h.branch, step=float(state["step"]), keys=keys,
                     hyperparameters=_hyperparameters(group), adapter=adapter_for(h.container).name)
        if "lookahead_ready" in state:
            entry["lookahead_ready"] = bool(state["lookahead_ready"])
        if h.name in params and params[h.name]["shape"] != entry["shape"]:
            problems.append(f"two parameters are named {h.name!r} (shapes {params[h.name]['shape']} and "
                            f"{entry['shape']}): give name_map= to tell them apart")
        params[h.name] = entry
        for key in keys:
            tensors[state_key(h.name, key)] = BoxedTensor(h.shape, h.boxes, h.local(state[key]))
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
                 framework: str | None = None,
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
        process_group: the group that saves together (default: every rank).

    Returns the manifest. Nothing is written when the ranks disagree (a ValueError says why).
    """
    with marsm_in(optimizer) as opt:
        return _save(opt, path, held_tensors(opt, _names(model, names), name_map), framework, process_group)


def _save(opt: MARSM, path: str | os.PathLike, held: list[HeldTensor], framework: str | None,
          process_group: dist.ProcessGroup | None) -> dict[str, Any]:
    tensors, params, problems = _describe(opt, held)
    params, problems = _merge(_gather((params, problems), process_group))
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
                 no_dist=not _distributed())
    world = dist.get_world_size(process_group) if _distributed() else 1
    manifest = dict(format=FORMAT, version=VERSION, written_by=framework or "+".join(adapters),
                    world_size=world, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    torch=torch.__version__, groups=groups, params=params,
                    seconds=round(time.perf_counter() - start, 3))
    if not _distributed() or dist.get_rank(process_group) == 0:
        write_manifest(path, manifest)
    if _distributed():
        dist.barrier(process_group)  # every rank returns once the checkpoint is complete
    return manifest


def _check_part(h: HeldTensor, state: dict[str, Any], manifest: dict[str, Any], stored: Mapping[str, Any],
                path: Any) -> tuple[list[str], list[str]]:
    """The keys to read for ``h`` and what is wrong with the checkpoint for it."""
    entry = manifest["params"].get(h.name)
    if entry is None:
        return [], [f"no state for parameter {h.name!r} in {path} (it holds {len(manifest['params'])} "
                    f"parameters; pass name_map= if the names differ between the two runs)"]
    if tuple(entry["shape"]) != h.shape:
        return [], [f"{h.name!r} has shape {tuple(entry['shape'])} in the checkpoint, {h.shape} here"]
    keys = [k for k in BRANCH_KEYS[h.branch] if k in state]
    problems = []
    for key in keys:
        md = stored.get(state_key(h.name, key))
        if md is None:
            other = entry["branch"] != h.branch
            saved = f"it was saved on the {entry['branch']} branch" if other else "the checkpoint is damaged"
            problems.append(f"{state_key(h.name, key)!r} is missing ({h.name!r} takes the {h.branch} branch "
                            f"here; {saved})")
        elif tuple(md.size) != h.shape:
            problems.append(f"{state_key(h.name, key)!r} has shape {tuple(md.size)}, the parameter {h.shape}")
    return keys, problems


def _damaged(path: str | os.PathLike, metadata: Any, fqns: set[str]) -> list[str]:
    """The keys among ``fqns`` whose data file is missing or shorter than the metadata says."""
    sizes: dict[str, int] = {}
    problems = []
    for index, info in metadata.storage_data.items():
        if index.fqn not in fqns:
            continue
        if info.relative_path not in sizes:
            file = Path(path) / info.relative_path
            sizes[info.relative_path] = file.stat().st_size if file.is_file() else -1
        have = sizes[info.relative_path]
        if have < info.offset + info.length:
            state = "missing" if have < 0 else f"{have} bytes, short of {info.offset + info.length}"
            problems.append(f"{index.fqn!r}: its data file {info.relative_path} is {state} (damaged)")
    return sorted(set(problems))


def _differences(opt: MARSM, held: list[HeldTensor], manifest: dict[str, Any]) -> list[str]:
    found = set()
    for h in held:
        entry = manifest["params"].get(h.name)
        if entry is None:
            continue
        saved = manifest["groups"][entry["group"]]
        mine = _hyperparameters(opt.param_groups[h.group_index])
        found |= {f"{k}: {saved[k]!r} saved, {mine[k]!r} here" for k in AGREED_KEYS
                  if k in saved and k in mine and k not in _NOT_COMPARED and saved[k] != mine[k]}
    return sorted(found)


def load_neutral(optimizer: Any, path: str | os.PathLike, *, model: Any = None,
                 names: Mapping[int, str] | None = None, name_map: NameMap | None = None,
                 strict: bool = True, process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Load MARS-M's state from a neutral checkpoint into ``optimizer`` (collective).

    Every parameter the optimizer holds is matched by name (see :func:`save_neutral` for
    ``model``, ``names`` and ``name_map``) and each rank reads only its own elements. The
    hyperparameters stay the optimizer's own (set them as the saved run had them; a difference
    other than ``lr`` is warned about). Everything is checked on every rank before anything is
    read: a missing parameter or key, a different shape, a parameter on the other branch
    (MARS-M vs AdamW), and, with ``strict``, a saved parameter that nothing here loads. Then
    nothing is changed and every rank raises ValueError naming the keys.

    Returns the manifest.
    """
    manifest = read_manifest(path)
    with marsm_in(optimizer) as opt:
        _load(opt, path, manifest, held_tensors(opt, _names(model, names), name_map), strict, process_group)
    return manifest


def _load(opt: MARSM, path: str | os.PathLike, manifest: dict[str, Any], held: list[HeldTensor], strict: bool,
          process_group: dist.ProcessGroup | None) -> None:
    metadata = dcp.FileSystemReader(path).read_metadata()
    stored = metadata.state_dict_metadata
    tensors: dict[str, BoxedTensor] = {}
    problems: list[str] = []
    for h in held:
        state = opt._ensure_state(opt.param_groups[h.group_index], h.container)
        keys, wrong = _check_part(h, state, manifest, stored, path)
        problems += wrong
        if not wrong:
            tensors.update({state_key(h.name, k): BoxedTensor(h.shape, h.boxes, h.local(state[k]))
                            for k in keys})
    problems += _damaged(path, metadata, set(tensors))
    gathered = _gather(([h.name for h in held], problems), process_group)
    problems = [p for _, probs in gathered for p in probs]
    loaded = {n for names_, _ in gathered for n in names_}
    if strict:
        problems += [f"parameter {n!r} of the checkpoint is not in this optimizer (strict=False loads "
                     f"the others)" for n in sorted(set(manifest["params"]) - loaded)]
    if problems:
        raise ValueError(f"load_neutral({str(path)!r}): nothing loaded: " + "; ".join(problems[:10])
                         + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({}, checkpoint_id=path, planner=BoxLoadPlanner(tensors), process_group=process_group,
                 no_dist=not _distributed())
    for h in held:
        entry, state = manifest["params"][h.name], opt.state[h.container]
        state["step"] = torch.tensor(entry["step"], dtype=torch.float32)
        if "lookahead_ready" in state:
            state["lookahead_ready"] = bool(entry.get("lookahead_ready", False))
    # Loaded state may be damaged: the next steps screen it for NaN/Inf, as after load_state_dict.
    opt._unscreened = {id(p) for p in opt.state}
    differ = _differences(opt, held, manifest)
    if differ and (not _distributed() or dist.get_rank() == 0):
        warnings.warn(f"load_neutral: hyperparameters differ from the saved run's ({'; '.join(differ)}); "
                      f"the state is loaded, the optimizer keeps its own", stacklevel=3)
