#!/usr/bin/env bash
# README command 2: set up .venv if needed (torch and every extra the tests use), lint with ruff, run the test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh dev,deepspeed,megatron,demo,mpi,clients
venv="${MARSM_VENV:-.venv}"
"$venv/bin/python" -m ruff check .
exec "$venv/bin/python" -m pytest "$@"
