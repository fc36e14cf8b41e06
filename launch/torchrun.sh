#!/usr/bin/env bash
# Run the demo trainer (python -m marsm_dist.demo) under torchrun: NUM_PROCS ranks on this
# machine (default 2), rendezvous at MASTER_ADDR:MASTER_PORT (default 127.0.0.1:29500). For
# several machines run it on each with NNODES and NODE_RANK set and MASTER_ADDR naming node 0
# (or use launch/slurm.sbatch). Every argument goes to the trainer, e.g.
#   NUM_PROCS=4 bash launch/torchrun.sh --steps 100 --optimizers marsm,adamw
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh "$(bash launch/demo_extras.sh "$@")"
venv="${MARSM_VENV:-.venv}"
exec "$venv/bin/python" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NUM_PROCS:-2}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m marsm_dist.demo "$@"
