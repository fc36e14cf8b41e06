"""The benchmarks' JSON files: one entry per run configuration, the others kept."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The tree's git commit (with "+changes" when tracked files differ from it), or why it is unknown."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"
    return head + ("+changes" if dirty else "")


def now() -> str:
    """The date and time, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def portable(value: Any) -> str:
    """``value`` as text without this machine's paths: the repository's root dropped (paths become
    repo-relative) and the interpreter's path replaced by ``python``."""
    return str(value).replace(sys.executable, "python").replace(str(ROOT) + os.sep, "")


def save_results(path: Path, key: str, args: argparse.Namespace, machine: dict[str, Any],
                 rows: list[dict[str, Any]] | dict[str, Any], **extra: Any) -> None:
    """Write ``rows`` (and the entries of ``extra``, e.g. a benchmark's floor) under ``key`` into
    the JSON at ``path``, keeping the file's other entries (so, e.g., the GPT-2 and demo runs sit
    side by side)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = {"args": {k: portable(v) for k, v in vars(args).items()}, "machine": machine,
                    "commit": git_commit(), "date": now(), "rows": rows, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path} [{key}]")
