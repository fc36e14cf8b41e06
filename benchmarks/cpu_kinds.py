"""Which kind of CPU a single-process figure comes from, and ``--cpu-kinds``: one script run again
for each kind (benchmarks/optimizer_step.py's module doc has the why).

``native``: bf16 matmul kernels (oneDNN on AVX-512-BF16/AMX). ``avx2``: none; MARSM emulates bf16
in float32 and torch falls back to a scalar bf16 loop. On a native machine the AVX2 kind runs in a
child process with oneDNN, MKL and ATen limited to AVX2 by :data:`AVX2_ENV`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from marsm_dist.newton_schulz import emulates_bfloat16

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
CPU_KINDS = ("native", "avx2")
KIND_TEXT = {"native": "native bf16 matmul kernels (oneDNN)",
             "avx2": "AVX2, no bf16 matmul kernels (MARSM emulates bf16; torch falls back to a scalar loop)"}
HELP = ("'this' (this CPU as it is) or a comma list of native,avx2: each kind other than this CPU's "
        "runs in a child process limited to it")


def cpu_kind() -> str:
    """``"native"`` on a CPU with bf16 matmul kernels, ``"avx2"`` where MARSM emulates bf16."""
    return "avx2" if emulates_bfloat16("cpu") else "native"


def limited() -> bool:
    """True in a process limited to AVX2 kernels by :data:`AVX2_ENV`."""
    return all(os.environ.get(k) == v for k, v in AVX2_ENV.items())


def cpu_model() -> str:
    """The CPU's model name."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: this process's CPU kind, and the env limiting it if any."""
    kind = cpu_kind()
    return f"CPU kind: {KIND_TEXT[kind]}" + (" (limited by env: " + " ".join(
        f"{k}={v}" for k, v in AVX2_ENV.items()) + ")" if kind == "avx2" and limited() else "")


def machine() -> dict[str, Any]:
    """The figures of this CPU that a result depends on (for the JSON)."""
    kind = cpu_kind()
    return {"cpu": cpu_model(), "cpu_kind": kind, "limited_by_env": kind == "avx2" and limited(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_emulated": emulates_bfloat16("cpu"), "threads": torch.get_num_threads()}


def run_kinds(kinds: str, script: str) -> None:
    """``script`` again (with this process's arguments less ``--cpu-kinds``) once per kind in the
    comma list ``kinds``: limited to AVX2 by env, or as this CPU is."""
    for kind in (k.strip() for k in kinds.split(",")):
        if kind not in CPU_KINDS:
            raise SystemExit(f"unknown CPU kind {kind!r}; expected one of {CPU_KINDS}")
        here = cpu_kind()
        if kind == "native" and here != "native":
            print("CPU kind native: not available (this CPU has no bf16 matmul kernels); skipped")
            continue
        argv = list(sys.argv[1:])
        i = argv.index("--cpu-kinds") if "--cpu-kinds" in argv else None
        if i is not None:
            del argv[i:i + 2]
        argv = [a for a in argv if not a.startswith("--cpu-kinds=")]
        env = dict(os.environ, **(AVX2_ENV if kind == "avx2" and here != "avx2" else {}))
        subprocess.run([sys.executable, script, *argv], env=env, check=True)
