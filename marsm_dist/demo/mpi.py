"""``mpiexec -n N python -m marsm_dist.demo.mpi [demo flags]``: the demo with ranks from MPI.

mpi4py supplies what torch.distributed needs: the rank and world size from ``COMM_WORLD``, the
local rank from the shared-memory sub-communicator, and the rendezvous address as rank 0's
host name, broadcast to every rank; the port is ``MASTER_PORT`` (default 29500). MPI only
starts the processes and hands out these numbers: training traffic goes through gloo or NCCL.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable


def env_from_mpi() -> Callable[[bool], None]:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from MPI.

    Returns the hook to call when the rank is done: ``MPI.Finalize`` after a success, and
    ``Abort`` after a failure, so the other ranks stop at once instead of waiting in a collective.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise SystemExit("marsm_dist.demo.mpi needs mpi4py: pip install 'marsm-dist[mpi]' "
                         "(mpi4py and the mpich wheel; launch/mpirun.sh installs them)") from err
    comm = MPI.COMM_WORLD
    host = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                      LOCAL_RANK=str(node.Get_rank()), LOCAL_WORLD_SIZE=str(node.Get_size()),
                      MASTER_ADDR=host, MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    node.Free()

    def on_exit(ok: bool) -> None:
        if ok:
            MPI.Finalize()
        else:
            comm.Abort(1)

    return on_exit


def main(argv: list[str] | None = None) -> int:
    """Fill the environment from MPI, then run this process as one rank of the demo."""
    on_exit = env_from_mpi()
    from .__main__ import main as demo_main

    return demo_main(argv, on_exit=on_exit)


if __name__ == "__main__":
    sys.exit(main())
