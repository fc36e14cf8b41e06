"""Section ``shared_gpu``: the optimizer's distributed paths at W = 2 and 4 on one GPU, over gloo.

NCCL refuses two ranks on one GPU; gloo carries CUDA tensors, so W processes share the one GPU
(``shared_worker.py`` runs each rank). What runs: 1-D FSDP2 (DTensor ``Shard(0)``) at W = 2 and 4,
HSDP 2 x 2, replicated data parallel (``process_group=``) at W = 2 and 4, and teams
(``ns_team_max=4``) at W = 4; each with ``overlap`` on and off and with ``timing=True``. What is
judged, per configuration: within 1e-5 of one process (fp32 Newton-Schulz); the three runs
bitwise equal; one device-to-host read per steady step (on a GPU); each step's peak memory flat
after the first (on a GPU); the collectives every rank issued, in an order NCCL accepts.

Across GPUs the collectives go through NCCL, which this section does not reach: it needs W GPUs
(section ``distributed``).
"""

from __future__ import annotations

from .core import Ctx, log, run_checks
from .external import launch_ranks

CONFIGS = [("fsdp2", 2), ("fsdp2", 4), ("hsdp", 4), ("ddp", 2), ("ddp", 4), ("teams", 4)]


def _order_problems(ranks: list[dict]) -> list[str]:
    from tests.helpers.collective_order import Event, check_collective_order

    problems = []
    for label in ranks[0]["collectives"]:
        logs = {r: [Event(g, tuple(rs), op, (sig,), None if sp is None else (tuple(sp[0]), tuple(sp[1])))
                    for g, rs, op, sig, sp in rank["collectives"][label]] for r, rank in enumerate(ranks)}
        try:
            check_collective_order(logs)
        except AssertionError as err:
            problems.append(f"{label}: collective order: {err}"[:500])
    return problems


def judge(ranks: list[dict], on_gpu: bool) -> dict:
    """One configuration's figures and problems, from its ranks' results."""
    diff = max(r["max_abs_diff_vs_single_process"] for r in ranks)
    problems = [] if diff <= 1e-5 else [f"max |W ranks - one process| {diff:.2e} > 1e-5"]
    if not all(r["bitwise_equal_overlap_serial_timing"] for r in ranks):
        problems.append("overlap on/off/timing runs differ")
    labels = list(ranks[0]["host_reads_per_step"])
    reads = {label: [r["host_reads_per_step"][label] for r in ranks] for label in labels}
    peaks = {label: [r["max_memory_allocated_per_step"][label] for r in ranks] for label in labels}
    if on_gpu:
        bad = {k: v for k, v in reads.items() if any(c != 1 for rank in v for c in rank[1:])}
        if bad:
            problems.append(f"host reads per steady step != 1: {bad}")
        for label, per_rank in peaks.items():
            for rank, steps in enumerate(per_rank):
                if max(steps[1:]) > steps[1] * 1.01 + 65536:
                    problems.append(f"{label}: rank {rank}'s peak memory grows across steps: {steps}")
    problems += _order_problems(ranks)
    stats = ranks[0]["stats"]["overlap"]
    return {"max_abs_diff_vs_single_process": diff, "host_reads_per_step": reads,
            "max_memory_allocated_per_step": peaks,
            "owned_matrices_per_rank": [r["stats"]["overlap"]["owned_matrices"] for r in ranks],
            "bytes_sent_per_rank": [r["stats"]["overlap"]["bytes_sent"] for r in ranks],
            "teams": stats["teams"], "problems": problems}


def section(ctx: Ctx) -> dict:
    """Run every configuration, each in W fresh processes on the one device."""
    backend = "gloo" if ctx.dry else "gloo-cuda"
    where = "CPU (dry run)" if ctx.dry else "one GPU (cuda:0)"
    log(f"  shared_gpu: W processes on {where} over gloo")

    def check(config: str, world: int):
        def run() -> dict:
            ranks = launch_ranks(ctx, f"shared_{config}", world, backend, timeout=120 if ctx.dry else 240)
            return judge(ranks, on_gpu=not ctx.dry)
        return run

    checks = run_checks({f"{config}_w{world}": check(config, world) for config, world in CONFIGS})
    ok = [n for n, c in checks.items() if c["status"] == "ok"]
    return {"backend": "gloo", "device": where, "checks": checks,
            "summary": f"{len(ok)} of {len(checks)} configurations ok on {where} over gloo: {', '.join(ok)}"}
