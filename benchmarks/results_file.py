"""The benchmarks' JSON files: one entry per run configuration, the others kept."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def save_results(path: Path, key: str, args: argparse.Namespace, machine: dict[str, Any],
                 rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` under ``key`` into the JSON at ``path``, keeping the file's other entries
    (so, e.g., the GPT-2 and demo runs sit side by side)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path} [{key}]")
