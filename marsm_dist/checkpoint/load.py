"""Loading the neutral form (see :mod:`.neutral`): every rank reads its own elements of each
named tensor into its state, after every rank has checked the checkpoint against its optimizer."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..optimizer import MARSM
from ..options import AGREED_KEYS
from .held import (
    BRANCH_KEYS,
    HeldTensor,
    NameMap,
    held_tensors,
    marsm_in,
    names_through_wrappers,
    sync_model_params,
)
from .manifest import read_manifest
from .neutral import distributed, gather, hyperparameters, names_for, state_key, weights_key
from .planners import BoxedTensor, BoxLoadPlanner

__all__ = ["load_neutral"]

# Schedulers move lr; the branch is checked per parameter (a use_marsm of None routes by shape).
_NOT_COMPARED = {"lr", "initial_lr", "use_marsm", "experts"}


def _check_part(h: HeldTensor, state: dict[str, Any], manifest: dict[str, Any], stored: Mapping[str, Any],
                path: Any) -> tuple[list[str], list[str]]:
    """The keys to read for ``h`` and what is wrong with the checkpoint for it."""
    entry = manifest["params"].get(h.name)
    if entry is None:
        return [], [f"no state for parameter {h.name!r} in {path} (it holds {len(manifest['params'])} "
                    f"parameters; pass name_map= if the names differ between the two runs)"]
    if tuple(entry["shape"]) != h.shape:
        return [], [f"{h.name!r} has shape {tuple(entry['shape'])} in the checkpoint, {h.shape} here"]
    if math.prod(h.shape) == 0:
        return [], []  # an empty parameter: nothing was written, nothing to read
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
        mine = hyperparameters(opt.param_groups[h.group_index])
        found |= {f"{k}: {saved[k]!r} saved, {mine[k]!r} here" for k in AGREED_KEYS
                  if k in saved and k in mine and k not in _NOT_COMPARED and saved[k] != mine[k]}
    return sorted(found)


def load_neutral(optimizer: Any, path: str | os.PathLike, *, model: Any = None,
                 names: Mapping[int, str] | None = None, name_map: NameMap | None = None,
                 strict: bool = True, weights: bool = False,
                 process_group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Load MARS-M's state from a neutral checkpoint into ``optimizer`` (collective).

    Every parameter the optimizer holds is matched by name (see :func:`save_neutral` for
    ``model``, ``names`` and ``name_map``) and each rank reads only its own elements. The
    hyperparameters stay the optimizer's own (set them as the saved run had them; a difference
    other than ``lr`` is warned about). Everything is checked on every rank before anything is
    read: a missing parameter or key, a different shape, a parameter on the other branch
    (MARS-M vs AdamW), and, with ``strict``, a saved parameter that nothing here loads. Then
    nothing is changed and every rank raises ValueError naming the keys.

    ``weights=True`` also restores the parameters the optimizer steps from a checkpoint saved with
    ``weights=True`` (the fp32 master weights under DeepSpeed or Megatron mixed precision, which
    the model's bf16 weights would round), then refreshes the model's own parameters from them
    through the framework (DeepSpeed ZeRO 1-3, Megatron; FSDP2 and DDP step the model's own).

    Returns the manifest.
    """
    manifest = read_manifest(path)
    if weights and not manifest.get("weights"):
        raise ValueError(f"load_neutral({str(path)!r}, weights=True): the checkpoint was saved without "
                         f"weights (save_neutral(..., weights=True) writes them)")
    with marsm_in(optimizer) as opt:
        held = held_tensors(opt, names_through_wrappers(optimizer, names_for(model, names)), name_map)
        _load(opt, path, manifest, held, strict, weights, process_group)
    if weights:
        sync_model_params(optimizer)
    return manifest


def _load(opt: MARSM, path: str | os.PathLike, manifest: dict[str, Any], held: list[HeldTensor], strict: bool,
          weights: bool, process_group: dist.ProcessGroup | None) -> None:
    metadata = dcp.FileSystemReader(path).read_metadata()
    stored = metadata.state_dict_metadata
    tensors: dict[str, BoxedTensor] = {}
    problems: list[str] = []
    seen: set[str] = set()
    for h in held:
        if h.name in seen:
            problems.append(f"two parameters here are named {h.name!r}: give name_map= to tell them apart")
        seen.add(h.name)
        state = opt._ensure_state(opt.param_groups[h.group_index], h.container)
        keys, wrong = _check_part(h, state, manifest, stored, path)
        problems += wrong
        if not wrong:
            tensors.update({state_key(h.name, k): BoxedTensor(h.shape, h.boxes, h.local(state[k]))
                            for k in keys})
        if weights and not wrong and math.prod(h.shape):
            md = stored.get(weights_key(h.name))
            if md is None or tuple(md.size) != h.shape:
                problems.append(f"{weights_key(h.name)!r} is missing or not of shape {h.shape}")
            else:
                tensors[weights_key(h.name)] = BoxedTensor(h.shape, h.boxes, h.local(h.container.detach()))
    problems += _damaged(path, metadata, set(tensors))
    gathered = gather(([h.name for h in held], problems), process_group)
    problems = [p for _, probs in gathered for p in probs]
    loaded = {n for names_, _ in gathered for n in names_}
    if strict:
        problems += [f"parameter {n!r} of the checkpoint is not in this optimizer (strict=False loads "
                     f"the others)" for n in sorted(set(manifest["params"]) - loaded)]
    if problems:
        raise ValueError(f"load_neutral({str(path)!r}): nothing loaded: " + "; ".join(problems[:10])
                         + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({}, checkpoint_id=path, planner=BoxLoadPlanner(tensors), process_group=process_group,
                 no_dist=not distributed())
    for h in held:
        entry, state = manifest["params"][h.name], opt.state[h.container]
        state["step"] = torch.tensor(entry["step"], dtype=torch.float32)
        if "lookahead_ready" in state:
            state["lookahead_ready"] = bool(entry.get("lookahead_ready", False))
    opt.note_state_loaded()  # loaded state may be damaged: the next steps screen it for NaN/Inf
    differ = _differences(opt, held, manifest)
    if differ and (not distributed() or dist.get_rank() == 0):
        warnings.warn(f"load_neutral: hyperparameters differ from the saved run's ({'; '.join(differ)}); "
                      f"the state is loaded, the optimizer keeps its own", stacklevel=3)
