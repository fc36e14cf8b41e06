"""``StepStats``: what one optimizer step did on this rank (``MARSM.last_step_stats``).

Read them through :func:`marsm_dist.step_stats`, which finds every MARSM inside a framework's
wrappers and adds their figures up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StepStats"]


@dataclass
class StepStats:
    """What the last step did (``MARSM.last_step_stats``), as seen by this rank.

    A framework that steps one param group at a time (DeepSpeed's ZeRO wrappers swap
    ``param_groups`` for each call) makes one training step out of several ``step()`` calls; their
    figures are added up until a call steps a parameter this training step has stepped already,
    so these describe the whole training step however the calls were split.

    Attributes:
        milliseconds: wall time per phase: elementwise, communication, newton_schulz, apply.
        bytes_sent, bytes_received: bytes exchanged with other ranks (gather + scatter).
        clipped: matrices whose c_t was clipped to unit norm.
        ns_flops_this_rank: predicted Newton-Schulz FLOPs this rank runs per step.
        ns_flops_max_over_mean: the owner plan's load balance (1.0 is perfect).
        owned_matrices: sharded matrices this rank orthogonalizes.
        sharded_matrices: matrices held over several ranks, each orthogonalized by one owner rank
            of the job (so ``owned_matrices`` summed over the ranks equals this).
        calls: the ``step()`` calls these figures add up (1 unless the framework splits a step).
    """

    milliseconds: dict[str, float]
    bytes_sent: int
    bytes_received: int
    clipped: int
    ns_flops_this_rank: int
    ns_flops_max_over_mean: float
    owned_matrices: int
    calls: int = 1
    sharded_matrices: int = 0

    def __add__(self, other: StepStats) -> StepStats:
        """The figures of two calls of one training step, together."""
        phases = {k: self.milliseconds.get(k, 0.0) + other.milliseconds.get(k, 0.0)
                  for k in {**self.milliseconds, **other.milliseconds}}
        return StepStats(phases, self.bytes_sent + other.bytes_sent,
                         self.bytes_received + other.bytes_received, self.clipped + other.clipped,
                         self.ns_flops_this_rank + other.ns_flops_this_rank,
                         max(self.ns_flops_max_over_mean, other.ns_flops_max_over_mean),
                         self.owned_matrices + other.owned_matrices, self.calls + other.calls,
                         self.sharded_matrices + other.sharded_matrices)
