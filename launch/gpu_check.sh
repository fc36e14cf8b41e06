#!/usr/bin/env bash
# The GPU figures in one command: env, bf16 matmul rate, Newton-Schulz throughput (MARSM vs
# torch.optim.Muon's own), CUDA-vs-CPU correctness, host syncs per step, peak step memory
# (benchmarks/memory.py), step time vs Muon/AdamW, and FSDP2 (+ DeepSpeed/Megatron where installed)
# over NCCL. Writes benchmarks/results/gpu_check.json and prints a summary table; exits 1 if a
# section failed. About 2-5 minutes on one H200.
#
#   bash launch/gpu_check.sh            # on a CUDA machine: python3 with torch, no venv, no setup
#   bash launch/gpu_check.sh --dry      # anywhere: CPU, tiny sizes, gloo (under a minute)
#   PY=/path/to/python bash launch/gpu_check.sh --only matmul,newton_schulz --json out.json
#
# The package is imported from this tree (PYTHONPATH=.), so nothing needs installing. launch/setup.sh
# is never called: a GPU machine has its own torch (and no internet).
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
for arg in "$@"; do
    if [ "$arg" = "--dry" ]; then dry=1; fi
done
if [ -z "${PY:-}" ]; then
    PY=python3
    if [ "$dry" = 1 ] && [ -x "${MARSM_VENV:-.venv}/bin/python" ]; then
        PY="${MARSM_VENV:-.venv}/bin/python"   # the CPU dry run may use the project's venv
    fi
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_check "$@"
