"""Converting a checkpoint holds one state tensor of one parameter at a time: measured with
``PeakMemory`` on a Llama-3-8B-shaped ZeRO-2 state on ``meta`` (benchmarks/checkpoint_memory.py),
for both writers; and the measurement sees a writer that keeps what it read."""

from __future__ import annotations

import argparse

from benchmarks import checkpoint_memory as cm
from marsm_dist.diagnostics import PeakMemory


def test_each_writer_peaks_at_the_largest_single_tensor():
    rows = cm.measure(argparse.Namespace(model="llama3-8b", world=8))
    for row in rows:
        assert row["params"] == 291 and row["total_state_gib"] > 59
        assert row["peak_gib"] == row["largest_tensor_gib"]  # 128256 x 4096 fp32: the embedding
        assert row["ratio"] <= 0.5


def test_the_measurement_sees_tensors_that_stay_alive():
    sds, shapes = cm.zero_states("llama3-tiny", 2)
    source = cm.source_from_states(sds, shapes, "meta", {})
    kept = []
    with PeakMemory() as peak:
        for p in source.params:
            kept += [load() for _, load in p.keys.values()]
    assert peak.peak == sum(t.nbytes for t in kept) > 2 * max(t.nbytes for t in kept)
