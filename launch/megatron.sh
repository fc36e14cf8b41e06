#!/usr/bin/env bash
# Pretrain a small megatron-core GPT with MARS-M (integrations/megatron/pretrain_gpt.py), started
# by torchrun. Environment: NUM_PROCS (default 2), MASTER_PORT (default 29500). Other arguments go
# to the script, e.g.  NUM_PROCS=4 bash launch/megatron.sh --tensor-model-parallel-size 2 \
#     --use-distributed-optimizer --bf16 --train-iters 500
# megatron-core's GPT needs CUDA GPUs (NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh megatron
venv="${MARSM_VENV:-.venv}"
exec "$venv/bin/python" -m torch.distributed.run --nproc-per-node "${NUM_PROCS:-2}" \
    --master-port "${MASTER_PORT:-29500}" integrations/megatron/pretrain_gpt.py "$@"
