"""Every MARSM hyperparameter (per param group) and option (per optimizer), defined once.

Each :class:`Option` carries its default, type, documentation and check. Everything else is
derived from :data:`OPTIONS`: ``MARSM``'s constructor signature and the Args of its docstring,
the validation of groups and options, the keys a saved group must have and the defaults older
checkpoints get, the keys every rank must agree on, and the settings the frameworks' configs
expose (the DeepSpeed JSON's ``optimizer.params``, torchtitan's ``MARSMContainer.Config``,
Megatron's ``--marsm-*`` flags). Adding a hyperparameter means adding one entry here (and using
it in the update).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .lr_scale import LRScale
from .newton_schulz import NS_COEFFICIENTS, NS_FORMS
from .ns_coefficients import Coefficients, parse_coefficients
from .option_checks import (
    Check,
    anything,
    check_betas,
    check_coefficients,
    check_dtype,
    check_lr_scale,
    dtype_name,
    flag,
    in_range,
    int_where,
    number,
    one_of,
    resolve_dtype,
)
from .sharding.plan import OWNER_POLICIES

__all__ = ["AGREED_KEYS", "ARGUMENTS", "ARITY", "CONFIG_OPTIONS", "INSTANCE_ATTRIBUTES",
           "NUMERIC_KEYS", "OPTIONS", "Option", "SAVED_GROUP_KEYS", "dtype_name", "group_defaults", "number",
           "resolve_dtype", "restore_group_types", "validate_group", "validate_optimizer_options"]

@dataclass(frozen=True)
class Option:
    """One hyperparameter or option of :class:`marsm_dist.MARSM`.

    Args:
        name: keyword (and param-group key).
        default: value when not given (also what a group saved before it existed gets on load).
        annotation: type shown in the constructor's signature.
        doc: one paragraph for the docstring and the config files' help.
        check: raises ``ValueError`` naming the option when a value is invalid.
        per_group: a param-group hyperparameter (else one value per optimizer).
        positional: may be passed by position (in :data:`OPTIONS` order).
        argument: a constructor argument (False: a group key only, set by ``param_groups``).
        since: version that added it; keys from "0.1" must be in every saved group.
        arity: numbers it holds (2 for a pair), for the ranks' agreement check.
        numeric: numbers the update reads (each may be a one-element tensor, also on the device).
        config: settable from a framework's config file (JSON, torchtitan, Megatron flags).
        attribute: per-optimizer options: the optimizer's attribute that keeps it ("": its name,
            None: used at construction only).
        parse_words: how a command line's words become the value (a flag taking one or more
            words); None: one word of ``config_type`` (or ``arity`` numbers).
    """

    name: str
    default: Any
    annotation: Any
    doc: str
    check: Check
    per_group: bool = True
    positional: bool = False
    argument: bool = True
    since: str = "0.1"
    arity: int = 1
    numeric: bool = False
    config: bool = True
    attribute: str | None = ""
    parse_words: Callable[[list[str]], Any] | None = None

    @property
    def config_default(self) -> Any:
        """The default as a config file writes it (a dtype by its name)."""
        return dtype_name(self.default) if isinstance(self.default, torch.dtype) else self.default

    @property
    def config_type(self) -> Any:  # (a dtype, or a rule that may also be a callable, is a name there)
        if self.annotation == (bool | None):
            return bool
        return str if isinstance(self.default, (torch.dtype, str)) else self.annotation


_SPARE_RANKS = ("sharded matrices only: where the plan leaves ranks idle for the whole step (more ranks "
                "than owners), up to this many consecutive ranks (a power of two) split the busiest owners' "
                "Newton-Schulz by columns, with an all-reduce of the m x m Gram matrix per iteration. 1: "
                "whole-matrix ownership. 8 cuts the Newton-Schulz critical path of Llama-3-8B at W=512 from "
                "4.2x to 1.6x the balanced ideal (benchmarks/scale_model.py).")

OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-3, float, "learning rate, shared by both branches.",
           in_range("lr", 0.0), positional=True, numeric=True),
    Option("weight_decay", 0.1, float, "decoupled weight decay, multiplied by the unscaled lr.",
           in_range("weight_decay", 0.0), positional=True, numeric=True),
    Option("momentum", 0.95, float, "EMA factor of the matrix momentum, in [0, 1).",
           in_range("momentum", 0.0, 1.0), positional=True, numeric=True),
    Option("gamma", 0.025, float, "variance-reduction strength (0 turns the correction off).",
           in_range("gamma", 0.0), positional=True, numeric=True),
    Option("ns_steps", 5, int, "Newton-Schulz iterations.",
           int_where("ns_steps", lambda n: 1 <= n <= 100, "must be an int in [1, 100]"),
           positional=True),
    Option("ns_dtype", torch.bfloat16, torch.dtype | str,
           'Newton-Schulz compute dtype (a name such as "float32" is accepted).', check_dtype,
           positional=True),
    Option("adamw_betas", (0.9, 0.95), tuple[float, float], "(beta1, beta2) of the AdamW branch.",
           check_betas, positional=True, arity=2, numeric=True),
    Option("adamw_eps", 1e-8, float, "eps of the AdamW branch, added to the uncorrected sqrt(v).",
           in_range("adamw_eps", 0.0), positional=True, numeric=True),
    Option("approx", True, bool, "True: the approximate correction (P = the last gradient, one backward "
           "per step); False: the exact one (call store_lookahead_grad() before each step).",
           flag("approx"), positional=True),
    Option("ns_coefficients", NS_COEFFICIENTS, Coefficients, 'the quintic\'s (a, b, c); or a list of one '
           'triple per Newton-Schulz iteration (the last repeats); or a preset: "quintic" (this triple) or '
           '"polar_express" (arXiv:2505.16932: closer to orthogonal in as many iterations).',
           check_coefficients, since="0.2", arity=3, parse_words=parse_coefficients),
    Option("flatten", False, bool, "orthogonalize tensors with more than 2 dims as (dim0, rest) matrices, "
           "with the scale from that shape (the common Muon convention). False: a batch of trailing 2-D "
           "matrices normalized by the whole-tensor norm, scale from the first two dims.",
           flag("flatten"), since="0.2"),
    Option("maximize", False, bool, "maximize the objective instead of minimizing it.",
           flag("maximize"), since="0.2"),
    Option("ns_form", "auto", str, '"plain" (the reference loop), "gram" (the same iteration on the small '
           'Gram factor: fewer FLOPs on rectangular matrices) or "auto" (Gram only in float32/float64 where '
           "it is clearly cheaper; bf16 always plain).", one_of("ns_form", NS_FORMS), since="0.2"),
    Option("lr_scale", "mars_m", LRScale, "the update's scale s (W <- W - lr s O) from the matrix's shape "
           '(A, B): "mars_m" 0.2 sqrt(max(A, B)) (the paper\'s; "match_rms_adamw" is the same by torch\'s '
           'name), "muon" sqrt(max(1, A/B)) (Keller Jordan\'s Muon), "spectral" sqrt(A/B), or a callable '
           "f((A, B)) -> s.",
           check_lr_scale, since="0.3"),
    Option("use_marsm", None, bool | None, "group key: True sends the group's tensors to MARS-M, False to "
           "AdamW, None routes each by its shape (2+ dims: MARS-M). Set by marsm_dist.param_groups.",
           flag("use_marsm", none_ok=True), argument=False, since="0.2", config=False),
    Option("experts", False, bool, "group key: dim 0 of each tensor indexes MoE experts, each stepped as "
           "its own matrix. Set by marsm_dist.param_groups.", flag("experts"), argument=False,
           since="0.2", config=False),
    Option("on_nonfinite", "raise", str, '"raise": a gradient with NaN/Inf raises NonFiniteGradError naming '
           'the parameter; "skip": the step is skipped. Either way nothing is changed, on every rank.',
           one_of("on_nonfinite", ("raise", "skip")), per_group=False),
    Option("owner_policy", "balanced", str, 'sharded matrices only: which rank orthogonalizes each matrix. '
           '"balanced" equalizes every exchange round\'s Newton-Schulz work; "round_robin" gives matrix i '
           "to rank i mod W (the paper's scheme).", one_of("owner_policy", OWNER_POLICIES), per_group=False),
    Option("bucket_bytes", 256 * 2**20, int, "the unit of the step's extra memory (counted as float32): at "
           "most this much of full matrices owned by one rank per exchange round or Newton-Schulz batch, "
           "and of each chunk of elementwise temporaries.",
           int_where("bucket_bytes", lambda n: n >= 4, "expected an int >= 4"), per_group=False),
    Option("timing", False, bool, "synchronize the device around each phase so last_step_stats times are "
           "exact on GPUs (costs a little speed).", flag("timing"), per_group=False, attribute=None),
    Option("process_group", None, Any, "the group over which plain (non-DTensor) parameters are "
           "replicated, as in torch DDP: each matrix gets one owner rank there, which runs its Newton-Schulz "
           "and sends the result to the others (torch.distributed.group.WORLD for a plain DDP job). None: "
           "each process orthogonalizes its own tensors. DeepSpeed ZeRO-0 and Megatron without the "
           "distributed optimizer set it for you.",
           anything, per_group=False, config=False, attribute="_process_group"),
    Option("overlap", True, bool, "sharded matrices only: pipeline the exchange rounds (one round's gather "
           "and the previous one's scatter in flight during a round's Newton-Schulz; about one more bucket).",
           flag("overlap"), per_group=False),
    Option("ns_team_max", 1, int, _SPARE_RANKS, int_where(
        "ns_team_max", lambda n: n >= 1 and n & (n - 1) == 0, "expected a power of two: 1, 2, 4, 8, ..."),
        per_group=False),
    Option("fused", False, bool, "the AdamW branch through torch's fused AdamW kernel (CPU, CUDA): one pass "
           "over each tensor instead of seven (5x faster on a 50257 x 768 embedding, 1 CPU thread); m and v "
           "bit for bit, the weights within rounding of the unfused path. Falls back where the kernel does "
           "not take the tensors.", flag("fused"), per_group=False, since="0.3"),
    Option("pin_memory", None, bool | None, "optimizer offload (state on the CPU, an NCCL-only group): stage "
           "the exchange through pinned host buffers, so the copies to and from the GPU overlap the host's "
           "work. None: pinned where CUDA is. False on a CPU-only host (pinning needs a CUDA runtime).",
           flag("pin_memory", none_ok=True), per_group=False, since="0.3"),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
AGREED_KEYS = tuple(o.name for o in OPTIONS if o.per_group)  # every group value a step uses
SAVED_GROUP_KEYS = tuple(o.name for o in OPTIONS if o.per_group and o.since == "0.1")
NUMERIC_KEYS = tuple(o.name for o in OPTIONS if o.numeric)
ARITY = {o.name: o.arity for o in OPTIONS if o.arity > 1}
CONFIG_OPTIONS = tuple(o for o in OPTIONS if o.config)
# The optimizer's attributes that keep its per-optimizer options: {attribute: option}.
INSTANCE_ATTRIBUTES = {o.attribute or o.name: o for o in OPTIONS
                       if not o.per_group and o.attribute is not None}
ARGUMENTS = tuple(o for o in OPTIONS if o.argument)  # the constructor's, in order


def group_defaults() -> dict[str, Any]:
    """Every param-group key with its default (what ``MARSM`` stores as ``defaults``)."""
    return {o.name: o.default for o in OPTIONS if o.per_group}


def restore_group_types(group: dict[str, Any]) -> None:
    """Give a group's values their own types back after a round trip through plain containers (a
    state dict, JSON): tuples that came back as lists, ``ns_dtype`` as a name. Values that cannot be
    converted are left for validation to refuse."""
    for key in ARITY:
        if isinstance(group.get(key), list):
            group[key] = tuple(tuple(v) if isinstance(v, list) else v for v in group[key])
    try:
        if isinstance(group.get("ns_dtype"), str):
            group["ns_dtype"] = resolve_dtype(group["ns_dtype"])
    except ValueError:
        pass


def validate_group(group: Mapping[str, Any], where: str = "", *, read_tensors: bool = True) -> None:
    """Raise ``ValueError`` naming the first invalid hyperparameter of ``group`` (or the defaults).
    ``read_tensors=False``: values held in device tensors are checked for shape only (a step checks
    their values after its one device-to-host read)."""
    for o in OPTIONS:
        if o.per_group:
            o.check(group.get(o.name, o.default), where, read_tensors)


def validate_optimizer_options(values: Mapping[str, Any]) -> None:
    """Check the optimizer-wide (not per-group) options."""
    for o in OPTIONS:
        if not o.per_group and o.name in values:
            o.check(values[o.name], "", True)


