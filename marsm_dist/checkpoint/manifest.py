"""The neutral checkpoint's manifest (``marsm_state.json``): what a reader needs besides the tensors.

Written last, by one rank, once every tensor is on disk: a directory without it is an incomplete
checkpoint. It names the writer, the world size, each parameter's shape, branch, step counter and
state keys, and the param groups' hyperparameters (plain JSON values, readable by anyone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..lr_scale import callable_name

__all__ = ["FORMAT", "MANIFEST", "VERSION", "jsonable", "read_manifest", "write_manifest"]

FORMAT = "marsm-neutral"
VERSION = 1
MANIFEST = "marsm_state.json"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values (tuples as lists, dtypes and other objects by name)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(value):  # an lr_scale rule: by name (its repr holds an address)
        return callable_name(value)
    return str(value).removeprefix("torch.")


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (a temporary file, then a rename)."""
    target = Path(path) / MANIFEST
    tmp = target.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the neutral checkpoint at ``path``; ValueError if it is not one."""
    target = Path(path) / MANIFEST
    if not target.is_file():
        raise ValueError(f"{path} is not a complete MARS-M neutral checkpoint: it has no {MANIFEST} (a "
                         f"save that did not finish, or another format: python -m marsm_dist.checkpoint "
                         f"inspect {path} tells which)")
    manifest = json.loads(target.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{target} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{target} is version {manifest['version']} of the neutral form; this marsm-dist "
                         f"reads up to version {VERSION}: upgrade marsm-dist")
    return manifest
