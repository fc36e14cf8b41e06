"""Checkpoints read one parameter at a time, whatever wrote them: the neutral form, a DCP
checkpoint of ``get_optimizer_state_dict`` (FSDP2, torchtitan, Accelerate's sharded state), a
``torch.save``-d ``MARSM.state_dict()`` with parameter names (DDP, the Hugging Face Trainer), and
(registered by the DeepSpeed adapter) DeepSpeed's own ZeRO checkpoints.

A source lists :class:`SourceParam` entries; each state tensor is a loader called when the tensor
is needed, so a conversion holds one tensor at a time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from ..functional import takes_marsm
from .held import BRANCH_KEYS, strip_wrappers
from .manifest import MANIFEST, jsonable, read_manifest

__all__ = ["Source", "SourceParam", "open_source", "register_source"]

Loader = Callable[[], torch.Tensor]


@dataclass
class SourceParam:
    """One parameter's saved MARS-M state: ``keys`` maps each state key to (dtype, loader)."""

    name: str
    shape: tuple[int, ...]
    branch: str
    step: float
    hyperparameters: dict[str, Any]
    keys: dict[str, tuple[torch.dtype, Loader]] = field(default_factory=dict)
    lookahead_ready: bool | None = None
    master: tuple[torch.dtype, Loader] | None = None  # the fp32 master weights, where saved


@dataclass
class Source:
    """A checkpoint as a list of parameters, with where it came from."""

    path: str
    format: str
    written_by: str
    world_size: int | None
    params: list[SourceParam]
    extra: dict[str, Any] = field(default_factory=dict)  # what a format-specific writer needs


def _read_tensor(path: str | os.PathLike, fqn: str, md: TensorStorageMetadata) -> Loader:
    def load() -> torch.Tensor:
        out = {fqn: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, checkpoint_id=path, no_dist=True)
        return out[fqn]
    return load


def _read_bytes(path: str | os.PathLike, fqns: list[str]) -> dict[str, Any]:
    if not fqns:
        return {}
    out: dict[str, Any] = dict.fromkeys(fqns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(out, checkpoint_id=path, no_dist=True)
    return out


def _neutral(path: Path) -> Source:
    manifest = read_manifest(path)
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    params = []
    for name, entry in manifest["params"].items():
        keys = {}
        for key in entry["keys"]:
            fqn = f"state.{name}.{key}"
            if fqn in stored:
                keys[key] = (stored[fqn].properties.dtype, _read_tensor(path, fqn, stored[fqn]))
        params.append(SourceParam(name, tuple(entry["shape"]), entry["branch"], entry["step"],
                                  manifest["groups"][entry["group"]], keys, entry.get("lookahead_ready")))
    return Source(str(path), "neutral", manifest["written_by"], manifest.get("world_size"), params)


def _split_path(fqn: str, mapping: dict[str, Any]) -> tuple[str, str, str] | None:
    """(section, parameter, key) of a flattened optimizer key: ``[prefix.]state.<name>.<key>`` or
    ``[prefix.]param_groups.<name>.<key>``."""
    path = mapping.get(fqn)
    if path is not None and len(path) >= 3 and path[-3] in ("state", "param_groups"):
        return path[-3], str(path[-2]), str(path[-1])
    for section in ("state", "param_groups"):
        head, found, rest = fqn.partition(f"{section}.")
        if found and (not head or head.endswith(".")) and "." in rest:
            name, _, key = rest.rpartition(".")
            return section, name, key
    return None


def branch_of(hyperparameters: dict[str, Any], shape: tuple[int, ...]) -> str:
    """The branch a saved parameter took: its group's ``use_marsm``, else its shape (the rule)."""
    use = hyperparameters.get("use_marsm")
    stacked = bool(hyperparameters.get("experts"))
    return "marsm" if takes_marsm(use if isinstance(use, bool) else None, shape, stacked) else "adamw"


def _dcp_groups(path: Path, fqns: dict[str, dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Parameter name -> its group's hyperparameters, from the ``param_groups.<i>.<key>`` entries
    (``params`` lists each group's parameter names) or, in the flattened form torchtitan saves
    (``flatten_optimizer_state_dict=True``), ``param_groups.<name>.<key>``."""
    values = _read_bytes(path, [f for keys in fqns.values() for f in keys.values()])
    by_name = {}
    for label, keys in fqns.items():
        group = {k: values[f] for k, f in keys.items()}
        for name in group.pop("params", None) or [label]:
            kept = {k: v for k, v in group.items() if k != "param_names"}
            by_name[strip_wrappers(str(name))] = jsonable(kept)
    return by_name


def _dcp_optimizer(path: Path) -> Source:
    metadata = dcp.FileSystemReader(path).read_metadata()
    mapping = metadata.planner_data or {}
    tensors: dict[str, dict[str, tuple[str, Any]]] = {}
    group_fqns: dict[str, dict[str, str]] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        parts = _split_path(fqn, mapping)
        if parts is None:
            continue
        section, name, key = parts
        if section == "state" and isinstance(md, TensorStorageMetadata):
            tensors.setdefault(strip_wrappers(name), {})[key] = (fqn, md)
        elif section == "param_groups" and isinstance(md, BytesStorageMetadata):
            group_fqns.setdefault(name, {})[key] = fqn  # name: the group's index
    hyper = _dcp_groups(path, group_fqns)
    params = []
    for name, keys in tensors.items():
        step = _read_tensor(path, *keys["step"])().item() if "step" in keys else 0.0
        shapes = [tuple(md.size) for k, (_, md) in keys.items() if k != "step"]
        shape = shapes[0] if shapes else ()
        branch = branch_of(hyper.get(name, {}), shape)
        shaped = {k: (fqn, md) for k, (fqn, md) in keys.items() if k in BRANCH_KEYS[branch]}
        params.append(SourceParam(name, shape, branch, float(step), hyper.get(name, {}), {
            k: (md.properties.dtype, _read_tensor(path, fqn, md)) for k, (fqn, md) in shaped.items()}))
    return Source(str(path), "dcp", "torch.distributed.checkpoint (get_optimizer_state_dict)", None, params)


def _torch_file(path: Path) -> Source:
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if isinstance(sd, dict) and "optimizer" in sd and "param_groups" not in sd:
        sd = sd["optimizer"]
    if not (isinstance(sd, dict) and "state" in sd and "param_groups" in sd):
        what = f"keys {sorted(sd)[:8]}" if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"{path} holds no optimizer state dict ({what})")
    params = []
    for gi, group in enumerate(sd["param_groups"]):
        names = group.get("param_names")
        if names is None:
            raise ValueError(f"{path}: param group {gi} has no 'param_names' (torch >= 2.6 saves them for "
                             f"named parameters): build the optimizer from param_groups(model, named=True)")
        hyper = jsonable({k: v for k, v in group.items() if k not in ("params", "param_names")})
        for pid, name in zip(group["params"], names, strict=True):
            state = sd["state"].get(pid, {})
            shapes = [tuple(v.shape) for k, v in state.items() if torch.is_tensor(v) and k != "step"]
            shape = shapes[0] if shapes else ()
            branch = branch_of(hyper, shape)
            keys = {k: (v.dtype, (lambda v=v: v)) for k, v in state.items() if k in BRANCH_KEYS[branch]}
            step = float(state["step"]) if "step" in state else 0.0
            params.append(SourceParam(strip_wrappers(name), shape, branch, step, hyper, keys,
                                      state.get("lookahead_ready")))
    return Source(str(path), "torch", "torch.save of an optimizer state_dict", None, params)


# (name, test(path), reader(path)): framework adapters add theirs (DeepSpeed's ZeRO checkpoints).
_SOURCES: list[tuple[str, Callable[[Path], bool], Callable[[Path], Source]]] = [
    ("neutral", lambda p: (p / MANIFEST).is_file(), _neutral),
    ("dcp", lambda p: (p / ".metadata").is_file(), _dcp_optimizer),
    ("torch", lambda p: p.is_file(), _torch_file),
]


def register_source(name: str, test: Callable[[Path], bool], reader: Callable[[Path], Source]) -> None:
    """Teach :func:`open_source` a checkpoint format (asked before the built-in DCP and file ones)."""
    if all(n != name for n, _, _ in _SOURCES):
        _SOURCES.insert(1, (name, test, reader))


def open_source(path: str | os.PathLike) -> Source:
    """The checkpoint at ``path`` as a :class:`Source` (ValueError if no reader knows it)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path} does not exist")
    for _, test, reader in _SOURCES:
        if test(p):
            return reader(p)
    known = ", ".join(n for n, _, _ in _SOURCES)
    raise ValueError(f"{path} is no checkpoint format marsm-dist reads ({known}; DeepSpeed's after "
                     f"import marsm_dist.adapters.deepspeed)")
