#!/usr/bin/env bash
# README command 1: set up .venv if needed, then train a small byte-level GPT on the Python
# standard library's source with MARS-M, Muon and AdamW on 2 FSDP2 ranks (gloo on CPU, NCCL on
# GPUs), print a comparison table and write demo_results/loss.png and demo_results/summary.json.
# The trainer starts its own worker processes (--world-size, default 2). Extra arguments go to
# `python -m marsm_dist.demo` (see --help: --steps, --d-model, --optimizers, --framework, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh "$(bash launch/demo_extras.sh "$@")"   # torch, matplotlib (+ the --framework's own)
exec "${MARSM_VENV:-.venv}/bin/python" -m marsm_dist.demo "$@"
