"""marsm-dist: a sharding-aware MARS-M optimizer for PyTorch.

MARS-M (arXiv 2510.21800) combines MARS's variance-reduced momentum with Muon's Newton-Schulz
orthogonalization for matrix parameters; other parameters take an AdamW branch.

Importing it has no side effects: no framework is imported or patched and no sharding adapter is
registered (see :mod:`marsm_dist.sharding.adapter` for when each one is).
"""

from .newton_schulz import NS_COEFFICIENTS, newton_schulz
from .optimizer import MARSM, NonFiniteGradError
from .param_groups import DEFAULT_HEAD_NAMES, RoutingDecision, explain_routing, param_groups, routing_report
from .stats import StepStats
from .step_report import marsm_optimizers, step_stats

__all__ = [
    "DEFAULT_HEAD_NAMES",
    "MARSM",
    "NS_COEFFICIENTS",
    "NonFiniteGradError",
    "RoutingDecision",
    "StepStats",
    "explain_routing",
    "marsm_optimizers",
    "newton_schulz",
    "param_groups",
    "routing_report",
    "step_stats",
]

__version__ = "0.2.0"
