#!/usr/bin/env bash
# Create the project's virtual environment (.venv, or $MARSM_VENV) and install marsm-dist into it.
#
# torch==2.13.0 is installed first and on its own: asked for unpinned (or through another
# package's requirements) pip would resolve torch to a multi-GB CUDA build. The project's own
# range (torch>=2.6,<2.15) is then already satisfied, so nothing else pulls a torch.
#
# MARSM_EXTRAS picks the extras to install (default "dev,deepspeed,megatron,demo,mpi,clients": the test
# tools, the frameworks whose adapters the tests exercise, matplotlib for the demo's plot, and
# mpi4py with the mpich wheel for launch/mpirun.sh, which the tests start too, and the trainers
# whose recipes live in integrations/: transformers, accelerate, lightning, torchtitan).
set -euo pipefail
cd "$(dirname "$0")/.."
# MARSM_SKIP_SETUP=1: the environment is ready (tests that start launch scripts set it).
[ "${MARSM_SKIP_SETUP:-0}" = 1 ] && exit 0
venv="${MARSM_VENV:-.venv}"
extras="${MARSM_EXTRAS:-dev,deepspeed,megatron,demo,mpi,clients}"
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    echo "setup: installing torch==2.13.0 (first, so pip never pulls a CUDA build)"
    "$py" -m pip install -q --disable-pip-version-check -U pip
    "$py" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
echo "setup: installing marsm-dist[$extras] (editable)"
"$py" -m pip install -q --disable-pip-version-check -c launch/constraints.txt -e ".[$extras]"
