"""What the demo tests share: tiny model flags, and the checks on a run's summary JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

TINY = ["--d-model", "32", "--heads", "2", "--layers", "1", "--batch-size", "8", "--seq-len", "32",
        "--log-every", "20"]


def check_summary(path: Path, optimizers: list[str], steps: int, world_size: int = 2) -> None:
    summary = json.loads(path.read_text())
    assert summary["world_size"] == world_size
    assert [r["optimizer"] for r in summary["results"]] == optimizers
    for r in summary["results"]:
        losses = r["losses"]
        assert len(losses) == steps and all(math.isfinite(x) for x in losses), r["optimizer"]
        # Bytes start near ln(256) = 5.55; the runs must make clear progress. (AdamW at its
        # default 1e-3, best for the full-size demo model, drops about 0.7 in 30 steps of the tiny
        # model here; MARS-M and Muon about 2.5.)
        assert sum(losses[-5:]) / 5 < losses[0] - 0.5, (r["optimizer"], losses)
        assert math.isfinite(r["val_loss"]) and r["val_loss"] < losses[0] - 0.5
        assert r["opt_step_ms"] > 0 and r["tokens_per_s"] > 0
