#!/usr/bin/env bash
# Run the demo trainer with MPI starting the ranks: mpiexec -n NUM_PROCS (default 2) runs
# `python -m marsm_dist.demo.mpi`, where mpi4py gives each process its rank, the world size and
# rank 0's host name as the rendezvous address; the port is MASTER_PORT (default 29500). The MPI
# is the project's own: the `mpich` wheel and mpi4py (the [mpi] extra), installed into the venv
# on first use, and the venv's mpiexec is the one used. MPIEXEC_ARGS adds mpiexec options (e.g.
# "-hosts node1,node2"). Every other argument goes to the trainer, e.g.
#   NUM_PROCS=2 bash launch/mpirun.sh --steps 100
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh "$(bash launch/demo_extras.sh "$@"),mpi"
venv="${MARSM_VENV:-.venv}"
py="$venv/bin/python"
if [ ! -x "$venv/bin/mpiexec" ] || ! "$py" -c "import mpi4py" 2>/dev/null; then
    echo "mpirun.sh: installing the [mpi] extra (mpi4py and the mpich wheel) into $venv"
    "$py" -m pip install -q --disable-pip-version-check -c launch/constraints.txt -e ".[mpi]"
fi
export MASTER_PORT="${MASTER_PORT:-29500}"
# shellcheck disable=SC2086  # MPIEXEC_ARGS is a list of options, split on purpose
exec "$venv/bin/mpiexec" ${MPIEXEC_ARGS:-} -n "${NUM_PROCS:-2}" "$py" -m marsm_dist.demo.mpi "$@"
