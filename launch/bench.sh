#!/usr/bin/env bash
# All benchmarks, one command: single-process optimizer step (MARSM vs torch.optim.Muon vs
# torch.optim.AdamW) on GPT-2-small-shaped matrices and on the demo model, then the sharding
# figures (bytes per rank vs the analytic minimum and an all-gather design, Newton-Schulz load
# balance and critical path, distributed step time at W=1 and W=2 on this machine), pipelined vs
# serial exchange rounds at W=2, and the plan-only scale model (Llama-3-8B/70B at W=8..1024).
# Each prints a table; JSON goes to benchmarks/results/. About 12 minutes on 2 CPU cores.
# Not here (long): `python benchmarks/quality.py` (the demo's learning-rate sweep, ~18 min on one
# core) and `benchmarks/optimizer_step.py --cpu-kinds native,avx2` (both CPU kinds in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh ""   # torch and marsm-dist only
py="${MARSM_VENV:-.venv}/bin/python"
skip=""
if "$py" -c "import sys; from marsm_dist.newton_schulz import emulates_bfloat16; sys.exit(not emulates_bfloat16())"; then
    # No bf16 matmul kernels on this CPU: torch.optim.Muon's bf16 step on GPT-2 shapes takes minutes
    # (141 s measured on an AVX2 CPU). Its row is left out here; muon[marsm-ns]+adamw, torch Muon on
    # the same matmuls as MARSM, stays. Run it alone: --warmup 1 --repeats 1 --key gpt2-small-2L-torch-muon
    echo "bench.sh: this CPU has no bf16 matmul kernels; skipping torch Muon's own bf16 row at GPT-2 shapes"
    skip="--skip muon+adamw,marsm-torch-bf16"
fi
# shellcheck disable=SC2086  # $skip is two words on purpose
"$py" benchmarks/optimizer_step.py --model gpt2-small --layers 2 $skip "$@"
"$py" benchmarks/optimizer_step.py --model demo --repeats 20 "$@"
"$py" benchmarks/sharding.py --json benchmarks/results/sharding.json
"$py" benchmarks/overlap.py
"$py" benchmarks/scale_model.py
