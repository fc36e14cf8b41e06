"""A run checkpointed at step 5 and resumed in a fresh process continues bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import resume_worker

ROOT = Path(__file__).resolve().parents[1]


def run_worker(*args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "tests.helpers.resume_worker", *args], cwd=ROOT, env=env,
                   check=True, timeout=120)


def test_resume_in_fresh_process_is_bit_identical(tmp_path):
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    run_worker("save", str(ckpt))
    run_worker("resume", str(ckpt), str(out))
    resumed = torch.load(out)
    for approx in (True, False):
        params, opt, sched = resume_worker.build(approx)
        resume_worker.train(params, opt, sched, 0, 10, approx)
        want, got = resume_worker.final(params, opt), resumed[approx]
        for n, p in want["params"].items():
            assert torch.equal(p, got["params"][n]), (approx, n)
        for i, st in want["optim"]["state"].items():
            for k, v in st.items():
                other = got["optim"]["state"][i][k]
                assert torch.equal(v, other) if torch.is_tensor(v) else v == other, (approx, i, k)
                if torch.is_tensor(v):
                    assert v.dtype == other.dtype
