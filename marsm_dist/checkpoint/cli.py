"""``python -m marsm_dist.checkpoint``: inspect a checkpoint, or convert it to another layout.

    python -m marsm_dist.checkpoint inspect PATH [--json]
    python -m marsm_dist.checkpoint convert SRC DST --to {neutral,deepspeed-universal} [--force]

Reads the neutral form, DCP checkpoints of ``get_optimizer_state_dict`` (FSDP2, torchtitan,
Accelerate), ``torch.save``-d optimizer state dicts with parameter names (DDP, the HF Trainer's
``optimizer.pt``) and DeepSpeed ZeRO-1/2/3 checkpoints (when DeepSpeed is installed). Exit
status 0 on success, 2 when the checkpoint is refused (the message names the key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .convert import convert
from .sources import Source, open_source


def _register_frameworks(path: Path) -> None:
    """Import DeepSpeed's readers when the path looks like its checkpoint (DeepSpeed is slow to import)."""
    tag = path
    if (path / "latest").is_file():
        tag = path / (path / "latest").read_text().strip()
    if path.is_dir() and any(tag.glob("*optim_states.pt")):
        try:
            from ..adapters import deepspeed_files
        except ImportError as err:
            raise SystemExit(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed ({err})") from err
        deepspeed_files.register()


def _register_writers(to: str) -> None:
    if to == "deepspeed-universal":
        from ..adapters import deepspeed_files

        deepspeed_files.register()


def describe(source: Source) -> dict[str, Any]:
    """What ``inspect`` reports, as plain values."""
    groups: dict[str, dict[str, Any]] = {}
    for p in source.params:
        groups.setdefault(json.dumps(p.hyperparameters, sort_keys=True, default=str), p.hyperparameters)
    params = [dict(name=p.name, shape=list(p.shape), branch=p.branch, step=p.step,
                   keys={k: str(dtype).removeprefix("torch.") for k, (dtype, _) in p.keys.items()})
              for p in source.params]
    return dict(path=source.path, format=source.format, written_by=source.written_by,
                world_size=source.world_size, parameters=len(source.params),
                branches=dict(Counter(p.branch for p in source.params)),
                steps=sorted({p.step for p in source.params}), hyperparameters=list(groups.values()),
                params=params)


def _print(info: dict[str, Any]) -> None:
    world = f", {info['world_size']} ranks" if info["world_size"] else ""
    print(f"{info['path']}: {info['format']} checkpoint, written by {info['written_by']}{world}")
    branches = ", ".join(f"{n} {b}" for b, n in sorted(info["branches"].items()))
    steps = ", ".join(f"{s:g}" for s in info["steps"])
    print(f"  {info['parameters']} parameters ({branches}); step {steps}")
    for i, hyper in enumerate(info["hyperparameters"]):
        shown = ", ".join(f"{k}={v}" for k, v in sorted(hyper.items()) if k not in ("param_names",))
        print(f"  hyperparameters {i}: {shown}")
    width = max((len(p["name"]) for p in info["params"]), default=4)
    print(f"  {'name':<{width}}  {'shape':<16} {'branch':<6} {'step':>6}  keys")
    for p in info["params"]:
        keys = ", ".join(f"{k} ({d})" for k, d in sorted(p["keys"].items()))
        shape = "x".join(map(str, p["shape"])) or "scalar"
        print(f"  {p['name']:<{width}}  {shape:<16} {p['branch']:<6} {p['step']:>6g}  {keys}")


def _progress(total: int):
    start, seen = time.perf_counter(), [0]

    def report(what: str) -> None:
        seen[0] += 1
        print(f"  [{seen[0]}/{total}] {what} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m marsm_dist.checkpoint",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="keys, shapes, step, hyperparameters, writer")
    inspect.add_argument("path", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    conv = sub.add_parser("convert", help="write the checkpoint in another layout")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    conv.add_argument("--to", required=True, help="neutral or deepspeed-universal")
    conv.add_argument("--force", action="store_true", help="replace DST if it exists")
    conv.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    try:
        path = args.path if args.command == "inspect" else args.src
        _register_frameworks(path)
        source = open_source(path)
        if args.command == "inspect":
            info = describe(source)
            print(json.dumps(info, indent=1)) if args.json else _print(info)
            return 0
        _register_writers(args.to)
        total = sum(len(p.keys) for p in source.params)
        start = time.perf_counter()
        progress = None if args.quiet else _progress(total)
        out = convert(source, args.dst, args.to, force=args.force, progress=progress)
        print(f"wrote {out} ({args.to}, {len(source.params)} parameters, "
              f"{time.perf_counter() - start:.1f} s)")
        return 0
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
