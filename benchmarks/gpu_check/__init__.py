"""The GPU check: one command that measures and checks MARSM on a CUDA machine, or on the CPU in
a dry mode with tiny sizes (``bash launch/gpu_check.sh [--dry]``, or ``python -m benchmarks.gpu_check``).

It writes one JSON, with the git commit and the date it ran at, and a record per section (env,
matmul, newton_schulz, correctness, host_syncs, memory, step_time, distributed, shared_gpu):
``{"status": "ok" | "failed" | "skipped", "seconds", ...}`` with the section's figures and a
one-line ``summary``, ``"error"`` and ``"traceback"`` when it failed, ``"reason"`` when it was
skipped. A section made of several checks keeps each under ``"checks"``,
recorded the same way. The process exits 1 if any section failed.
"""
