"""benchmarks/roofline.py (the step's floor, by hand and measured), its report in
benchmarks/optimizer_step.py, and benchmarks/muon_parity.py at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import roofline

ROOT = Path(__file__).resolve().parents[1]


def test_bytes_per_element_follow_the_derivation():
    assert sum(roofline.marsm_bytes_per_element(torch.bfloat16).values()) == 42
    assert sum(roofline.marsm_bytes_per_element(torch.float32).values()) == 44
    assert roofline.ADAMW_BYTES == 28


def test_floor_by_hand():
    # One (8, 4) matrix, m=4, n=8: 5 plain iterations of 2 (1.5 m^2 n + 0.5 m^3) FLOPs (X X^T and
    # S S symmetric: half each); 10 AdamW elements.
    rates = {(4, 8): 1e9}
    floor = roofline.step_floor([(8, 4)], [(10,)], rates, bandwidth=1e9)
    assert floor["ns_flops"] == 5 * 2 * (1.5 * 16 * 8 + 0.5 * 64) == 2240
    assert floor["ns_seconds"] == pytest.approx(2240 / 1e9)
    assert floor["bytes"] == 32 * 42 + 10 * 28
    assert floor["memory_seconds"] == pytest.approx(floor["bytes"] / 1e9)
    assert floor["floor_seconds"] == pytest.approx(floor["ns_seconds"] + floor["memory_seconds"])
    assert "4x8" in roofline.describe(floor)


def test_measured_rates_are_per_shape_and_positive():
    rates = roofline.measure_matmul_rate([(16, 32), (32, 16), (8, 8)], torch.float32, "cpu", repeats=2)
    assert set(rates) == {(16, 32), (8, 8)} and all(r > 0 for r in rates.values())
    assert roofline.measure_copy_bandwidth("cpu", numel=2**16, repeats=2) > 0
    floors = roofline.floors([(16, 32)], [(5,)], "cpu", (torch.bfloat16, torch.float32))
    assert set(floors) == {"bfloat16", "float32"}
    assert all(f["floor_seconds"] > f["ns_seconds"] > 0 for f in floors.values())


def _run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_optimizer_step_reports_the_floor(tmp_path):
    out = tmp_path / "o.json"
    text = _run(["benchmarks/optimizer_step.py", "--model", "demo", "--layers", "1", "--warmup", "0",
                 "--repeats", "1", "--threads", "1", "--skip", "marsm-fp32-ns,muon[marsm-ns]+adamw",
                 "--json", str(out)])
    assert "x floor" in text and "floor (bfloat16 NS)" in text and "floor (float32 NS)" in text
    entry = next(iter(json.loads(out.read_text()).values()))
    assert set(entry["floors"]) == {"bfloat16", "float32"}
    assert all(row["floor_multiple"] > 0 for row in entry["rows"].values())
    rows, floors = entry["rows"], entry["floors"]
    assert rows["marsm-fp32-ns-plain"]["floor_seconds"] == floors["float32"]["floor_seconds"]
    assert rows["marsm"]["floor_seconds"] == floors["bfloat16"]["floor_seconds"]


@pytest.mark.slow
def test_muon_parity_tiny(tmp_path):
    out = tmp_path / "p.json"
    text = _run(["benchmarks/muon_parity.py", "--dim", "16", "--threads", "1", "--warmup", "1",
                 "--pairs", "2", "--profile", "--json", str(out)])
    assert "MARSM/Muon" in text and "top 15 ops" in text
    (row,) = next(iter(json.loads(out.read_text()).values()))["rows"]
    assert row["threads"] == 1 and row["ratio"] > 0 and len(row["marsm_all_ms"]) == 2
    assert set(row["marsm_phase_ms"]) >= {"elementwise", "newton_schulz", "apply"}
