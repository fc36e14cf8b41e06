"""Convert a checkpoint from the layout one framework wrote to the neutral form or to another
framework's, one parameter state tensor at a time, checking first what can be checked.

Writers take a :class:`~.sources.Source`. The neutral writer is DCP with a planner whose tensors
are the source's loaders: DCP's file writer resolves them one after another, so the process holds
one state tensor of one parameter at a time (``benchmarks/checkpoint_memory.py`` measures it).
Everything is written to ``DST.partial`` and renamed at the end: a failed conversion leaves no
``DST``.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ..options import SAVED_GROUP_KEYS
from .manifest import FORMAT, VERSION, jsonable, write_manifest
from .planners import LoaderSavePlanner
from .sources import Source, SourceParam

__all__ = ["FORMATS", "check_source", "convert", "register_writer", "write_neutral"]

#: Keys a parameter of each branch must have saved (``lookahead_grad`` only in the exact mode).
REQUIRED = {"marsm": ("exp_avg", "last_grad"), "adamw": ("exp_avg", "exp_avg_sq")}


def check_source(source: Source) -> list[str]:
    """What makes ``source`` unloadable as MARS-M state, each problem naming its key."""
    problems = []
    if not source.params:
        problems.append(f"{source.path} holds no optimizer state")
    for p in source.params:
        missing = [k for k in SAVED_GROUP_KEYS if k not in p.hyperparameters]
        if missing:
            problems.append(f"param_groups of {p.name!r} have no {missing}: this is another optimizer's "
                            f"state (keys {sorted(p.hyperparameters)[:8]}), not MARS-M's")
            break
        if p.step > 0:  # state exists once a step ran
            problems += [f"'state.{p.name}.{k}' is missing ({p.name!r} is on the {p.branch} branch)"
                         for k in REQUIRED[p.branch] if k not in p.keys]
    return problems


def _entry(p: SourceParam, groups: list[dict[str, Any]]) -> dict[str, Any]:
    hyper = jsonable(p.hyperparameters)
    if hyper not in groups:
        groups.append(hyper)
    entry = dict(shape=list(p.shape), branch=p.branch, step=p.step, keys=sorted(p.keys),
                 group=groups.index(hyper))
    if p.lookahead_ready is not None:
        entry["lookahead_ready"] = bool(p.lookahead_ready)
    return entry


def write_neutral(source: Source, dst: Path, progress: Callable[[str], None] | None = None,
                  storage_writer: Any = None) -> dict[str, Any]:
    """Write ``source`` in the neutral form at ``dst`` (one process; see the module docstring).
    ``storage_writer``: DCP's writer for the tensors instead of files under ``dst`` (the manifest
    still goes to ``dst``)."""
    tensors = {}
    for p in source.params:
        for key, (dtype, load) in p.keys.items():
            tensors[f"state.{p.name}.{key}"] = (p.shape, dtype, _announced(load, p.name, key, progress))
    groups: list[dict[str, Any]] = []
    params = {p.name: _entry(p, groups) for p in source.params}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({}, checkpoint_id=None if storage_writer else dst, storage_writer=storage_writer,
                 planner=LoaderSavePlanner(tensors), no_dist=True)
    manifest = dict(format=FORMAT, version=VERSION, written_by=source.written_by,
                    world_size=source.world_size, converted_from=source.format,
                    time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), torch=torch.__version__,
                    groups=groups, params=params, seconds=round(time.perf_counter() - start, 3))
    write_manifest(dst, manifest)
    return manifest


def _announced(load: Callable[[], torch.Tensor], name: str, key: str,
               progress: Callable[[str], None] | None) -> Callable[[], torch.Tensor]:
    def loaded() -> torch.Tensor:
        if progress is not None:
            progress(f"{name}.{key}")
        return load()
    return loaded


# Format name -> writer(source, dst, progress). Framework adapters add theirs.
FORMATS: dict[str, Callable[[Source, Path, Any], Any]] = {"neutral": write_neutral}


def register_writer(name: str, writer: Callable[[Source, Path, Any], Any]) -> None:
    """Teach :func:`convert` the output format ``name`` (idempotent)."""
    FORMATS.setdefault(name, writer)


def convert(source: Source, dst: str | os.PathLike, to: str, *, force: bool = False,
            progress: Callable[[str], None] | None = None) -> Path:
    """Write ``source`` to ``dst`` in format ``to``; ValueError, with nothing written, when the
    source is not loadable MARS-M state, ``dst`` exists (unless ``force``) or ``to`` is unknown."""
    if to not in FORMATS:
        raise ValueError(f"unknown format {to!r}: one of {sorted(FORMATS)} (deepspeed-universal needs "
                         f"DeepSpeed installed)")
    problems = check_source(source)
    if problems:
        raise ValueError(f"{source.path}: nothing written: " + "; ".join(problems[:10]))
    dst = Path(dst)
    if dst.exists() and not force:
        raise ValueError(f"{dst} exists: nothing written (--force replaces it)")
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        FORMATS[to](source, partial, progress)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    return dst
