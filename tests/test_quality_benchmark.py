"""benchmarks/quality.py: the best-rate pick, the grid extension, and one tiny real sweep."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quality import Run, best_rate, extensions, summarize

ROOT = Path(__file__).resolve().parents[1]


def _runs(row: str, table: dict[float, list[float]]) -> list[Run]:
    return [Run(row, lr, seed, val_loss=v) for lr, vals in table.items() for seed, v in enumerate(vals)]


def test_best_rate_is_the_lowest_mean_and_a_diverged_seed_disqualifies():
    runs = _runs("adamw", {1e-3: [2.6, 2.4], 2e-3: [2.45, 2.5], 4e-3: [2.0, math.inf]})
    assert best_rate(runs, "adamw") == 2e-3  # mean 2.475 < 2.5; 4e-3 diverged on seed 1
    s = summarize(runs, "adamw")
    assert s["best_mean_val_loss"] == pytest.approx(2.475)
    assert (s["best_min"], s["best_max"]) == (2.45, 2.5)
    assert s["best_half_range"] == pytest.approx(0.025)
    assert not s["best_at_grid_edge"]
    assert s["rates"][2]["mean_val_loss"] is None and s["rates"][2]["val_loss_per_seed"] == [2.0, None]


def test_a_best_rate_at_the_grid_edge_extends_the_grid_on_that_side_only():
    runs = _runs("muon", {1e-2: [2.2, 2.3], 2e-2: [2.3, 2.4]})
    extended = {"muon": [0, 0]}
    new = extensions(runs, ["muon"], [0, 1], extended, max_extend=1)
    assert [(r.lr, r.seed) for r in new] == [(5e-3, 0), (5e-3, 1)] and extended["muon"] == [1, 0]
    assert extensions(runs, ["muon"], [0, 1], extended, max_extend=1) == []  # the limit


@pytest.mark.slow
def test_tiny_sweep_writes_every_run_and_picks_the_lowest_mean(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--steps", "2", "--seeds", "1", "--rows", "adamw",
         "--rates", "adamw=1e-3,3e-3", "--max-extend", "0", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "run 2/2" in proc.stderr and "best rate per row" in proc.stdout
    entry = json.loads(out.read_text())["demo-2steps"]
    assert entry["machine"]["cpu_kind"] in ("native bf16", "AVX2 emulation")
    assert "quality.py" in entry["args"]["command_line"] and entry["args"]["steps"] == "2"
    (row,) = entry["rows"]
    assert row["row"] == "adamw" and [r["lr"] for r in row["rates"]] == [1e-3, 3e-3]
    assert len(row["runs"]) == 2 and all(math.isfinite(r["val_loss"]) for r in row["runs"])
    means = {r["lr"]: r["mean_val_loss"] for r in row["rates"]}
    assert row["best_lr"] == min(means, key=means.get)
    assert row["best_mean_val_loss"] == min(means.values())


def test_result_files_record_no_machine_paths():
    """Benchmarks write their arguments repo-relative, the interpreter as ``python``."""
    from benchmarks.results_file import ROOT, portable

    assert portable(ROOT / "benchmarks" / "results" / "quality.json") == "benchmarks/results/quality.json"
    line = f"{sys.executable} benchmarks/quality.py --steps 3"
    assert portable(line) == "python benchmarks/quality.py --steps 3"
