"""``python -m marsm_dist.demo``: train a small byte-level GPT with MARS-M, Muon and AdamW on N ranks.

Without a launcher it starts ``--world-size`` processes itself; under torchrun, the deepspeed
launcher or ``marsm_dist.demo.mpi`` (which set ``RANK``/``WORLD_SIZE``) it is one of the ranks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .cli import UsageError, check, parse_args
from .dist_env import TooFewGPUsError, check_gpus, launched


def main(argv: list[str] | None = None, on_exit: Callable[[bool], None] | None = None) -> int:
    """Check the flags, then start the ranks (or be one). Returns the exit code when it starts them."""
    args = parse_args(argv)
    world_size = int(os.environ["WORLD_SIZE"]) if launched() else args.world_size
    try:
        check(args, world_size)
        check_gpus(world_size)
    except UsageError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"python -m marsm_dist.demo: error: {err}", file=sys.stderr)
        return 2
    except TooFewGPUsError as err:
        # Under a launcher every rank of the machine sees the same numbers: one of them says it.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"python -m marsm_dist.demo: error: {err}", file=sys.stderr)
        return 2
    if args.framework == "megatron":
        # Megatron's tensor-parallel layers overlap their gradient all-reduce with compute only if
        # CUDA runs one work queue per device (they warn otherwise); it must be set before CUDA starts.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if launched():
        from .worker import run_worker

        run_worker(args, on_exit)  # leaves the process
    from .launch import spawn

    return spawn(args, world_size)


if __name__ == "__main__":
    sys.exit(main())
