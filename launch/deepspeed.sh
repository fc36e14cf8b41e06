#!/usr/bin/env bash
# Train a small byte-level GPT (integrations/deepspeed/model.py) with DeepSpeed and MARS-M
# ("type": "MARSM" in the JSON config), started by the deepspeed launcher. Environment:
# NUM_PROCS (default 2), DS_CONFIG (default
# integrations/deepspeed/zero2.json), MASTER_PORT (default 29500). Other arguments go to
# integrations/deepspeed/train.py (--steps, --d-model, --layers, --log-every, ...).
# On a machine without GPUs the processes run on the CPU (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh deepspeed
venv="${MARSM_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # MARSM_VENV may be absolute
export PATH="$venv/bin:$PATH"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
exec deepspeed --num_gpus "${NUM_PROCS:-2}" --master_port "${MASTER_PORT:-29500}" \
    integrations/deepspeed/train.py --deepspeed_config "${DS_CONFIG:-integrations/deepspeed/zero2.json}" "$@"
