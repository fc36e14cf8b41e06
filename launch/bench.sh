#!/usr/bin/env bash
# All benchmarks, one command: single-process optimizer step (MARSM vs torch.optim.Muon vs
# torch.optim.AdamW) on GPT-2-small-shaped matrices and on the demo model, then the sharding
# figures (bytes per rank vs the analytic minimum and an all-gather design, Newton-Schulz load
# balance, distributed step time at W=1 and W=2 on this machine). Each prints a table; JSON goes
# to benchmarks/results/. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
py="${MARSM_VENV:-.venv}/bin/python"
"$py" benchmarks/optimizer_step.py --model gpt2-small --layers 2 "$@"
"$py" benchmarks/optimizer_step.py --model demo --repeats 20 "$@"
"$py" benchmarks/sharding.py --json benchmarks/results/sharding.json
