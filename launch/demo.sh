#!/usr/bin/env bash
# README command 1: set up .venv if needed, then train a tiny byte-level GPT on the Python
# standard library's source with MARS-M, Muon and AdamW and print a comparison table.
# Extra arguments go to `python -m marsm_dist.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec "${MARSM_VENV:-.venv}/bin/python" -m marsm_dist.demo --optimizers marsm,muon,adamw "$@"
