"""The demo trainer's short mode: every optimizer trains, the loss falls, the JSON is written."""

from __future__ import annotations

import json
import math

import pytest

from marsm_dist.demo.__main__ import main


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_demo_short_run(tmp_path, mode):
    out = tmp_path / "summary.json"
    optimizers = "marsm,muon,adamw" if mode == "approx" else "marsm"
    main(["--optimizers", optimizers, "--steps", "40", "--d-model", "32", "--heads", "2",
          "--batch-size", "8", "--seq-len", "32", "--log-every", "20", "--mode", mode,
          "--json", str(out)])
    summary = json.loads(out.read_text())
    assert [r["config"]["optimizer"] for r in summary] == optimizers.split(",")
    for r in summary:
        losses = r["losses"]
        assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
        # Bytes start near ln(256) = 5.55; 40 steps must make clear progress.
        assert sum(losses[-5:]) / 5 < losses[0] - 1.0, (r["config"]["optimizer"], losses)
        assert math.isfinite(r["val_loss"]) and r["opt_step_ms"] > 0
