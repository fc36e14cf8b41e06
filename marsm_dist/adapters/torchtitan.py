"""torchtitan 0.3: MARS-M as the job's optimizer, through torchtitan's own extension points.

torchtitan builds its optimizer from the job config: ``Trainer.Config.optimizer`` is an
``OptimizersContainer.Config`` and, once the model is parallelized, the trainer calls
``config.optimizer.build(model_parts=...)``, which constructs the class that Config is nested in.
:class:`MARSMContainer` is such a container, with its own ``Config``, so either of torchtitan's
ways of changing a component selects MARS-M:

* on any launch line, ``--override.imports marsm_dist.adapters.torchtitan.marsm``: torchtitan's
  override mechanism swaps the job's optimizer config for a MARS-M one before anything is built.
  lr, weight_decay, betas and eps come from the replaced AdamW config; MARS-M's own options go in
  JSON: ``'marsm_dist.adapters.torchtitan.marsm={"gamma": 0.05}'``;
* in a ``config_registry`` function: ``config.optimizer = MARSMContainer.Config(lr=3e-3)``; then
  ``--optimizer.gamma 0.05`` and the other fields below work on the command line.

Each model part gets one ``MARSM(param_groups(part))``: hidden matrices take MARS-M; embeddings,
the head and 1-D tensors the AdamW branch. FSDP2 DTensors are sharded: one Newton-Schulz owner
rank per matrix. Parameters are named by torchtitan's canonical FQNs, so ``CheckpointManager``
stores MARSM's state under torchtitan's flat keys (``state.<fqn>.exp_avg``,
``param_groups.<fqn>.lr``), the same keys on every rank. The state exists from construction, so
torchtitan never runs its zero-gradient dummy step (which would advance MARSM's step counters).
"""

from __future__ import annotations

import logging
from dataclasses import field, make_dataclass, replace
from typing import Any

from torch import nn
from torchtitan.components.checkpointer.utils import canonical_fqn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config.override import override

from ..checkpoint.held import register_inner
from ..optimizer import MARSM
from ..options import CONFIG_OPTIONS
from ..param_groups import param_groups
from ..step_report import step_stats
from ._common import refuse_exact_mode

__all__ = ["MARSMContainer", "marsm"]

logger = logging.getLogger(__name__)

# torchtitan's AdamW kwargs (ParamGroupConfig.optimizer_kwargs) -> MARSM's names for them.
_FROM_ADAMW = {"lr": "lr", "weight_decay": "weight_decay", "betas": "adamw_betas", "eps": "adamw_eps"}


# Fields of the Config beyond MARSM's own settings (routing adjustments, the AdamW branch's lr).
_EXTRA_FIELDS = (
    ("adamw_lr", float | None, None, "lr of the AdamW branch; None: the same as lr."),
    ("marsm", list[str], list, "Glob patterns of parameter names forced to MARS-M."),
    ("adamw", list[str], list, "Glob patterns of parameter names forced to the AdamW branch."),
    ("experts", list[str], list, "Glob patterns of stacked MoE expert tensors (dim 0: experts) beside "
                                 "GroupedExperts'."),
)


def _config_class() -> type:
    """``MARSMContainer.Config``: an ``OptimizersContainer.Config`` with one field per MARSM setting a
    config can hold (:data:`marsm_dist.options.CONFIG_OPTIONS`, defaults as a config writes them) and
    the routing fields; each field's doc is in its metadata (``"help"``)."""
    specs: list[tuple[str, Any, Any]] = []
    for o in CONFIG_OPTIONS:
        default = o.config_default
        spec = field(default=default, metadata={"help": o.doc})
        specs.append((o.name, o.config_type, spec))
    for name, kind, default, doc in _EXTRA_FIELDS:
        spec = (field(default_factory=default, metadata={"help": doc}) if callable(default)
                else field(default=default, metadata={"help": doc}))
        specs.append((name, kind, spec))
    config = make_dataclass("Config", specs, bases=(OptimizersContainer.Config,), kw_only=True, slots=True)
    config.__qualname__ = "MARSMContainer.Config"
    config.__module__ = __name__
    config.__doc__ = ("MARSM's hyperparameters and options (see ``marsm_dist.MARSM``) and the routing "
                      "adjustments.")
    return config


def _one_part(wrapper: Any) -> MARSM | None:
    """A one-part container's MARSM (with pipeline stages, pass ``container.optimizers[i]``)."""
    if isinstance(wrapper, MARSMContainer) and len(wrapper.optimizers) == 1:
        return wrapper.optimizers[0]
    return None


class MARSMContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` holding one ``MARSM`` per model part.

    Usage: ``config.optimizer = MARSMContainer.Config(lr=3e-3, gamma=0.025)`` in a torchtitan
    ``config_registry`` function, or ``--override.imports marsm_dist.adapters.torchtitan.marsm``.
    The inherited ``param_groups`` must stay empty (routing is by :func:`marsm_dist.param_groups`,
    adjusted with ``marsm``/``adamw``); ``implementation`` is ignored (MARSM has no fused kernel).
    """

    Config = _config_class()  # MARSM's settings from marsm_dist.options, plus the routing fields

    optimizers: list[MARSM]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        if config.param_groups:
            raise ValueError("MARSMContainer routes parameters itself (marsm_dist.param_groups, adjusted "
                             "with the marsm/adamw patterns); leave param_groups empty")
        refuse_exact_mode([config.approx], "MARSM's exact mode (approx=False) needs a second backward pass "
                          "per step, which torchtitan's train_step does not run; use approx=True (default)")
        options = {name: getattr(config, name) for name in _marsm_options()}
        adamw_options = None if config.adamw_lr is None else {"lr": config.adamw_lr}
        self.model_parts = model_parts
        self.optimizers = []
        register_inner(_one_part)  # save_neutral(container, ...) reaches the MARSM of a one-part model
        all_params: list[nn.Parameter] = []
        for part in model_parts:
            groups = param_groups(part, marsm=config.marsm, adamw=config.adamw, experts=config.experts,
                                  adamw_options=adamw_options)
            for group in groups:
                # torchtitan keys checkpoints by canonical FQNs (activation-checkpoint wrappers
                # stripped), so a run saved with AC loads without it and the reverse.
                group["params"] = [(canonical_fqn(name), p) for name, p in group["params"]]
                all_params.extend(p for _, p in group["params"])
            optimizer = MARSM(groups, **options)
            # Every state key now, on every rank: torchtitan's checkpoint helpers then find the
            # state and skip their dummy step (FSDP2 parameters already have it; plain ones not).
            optimizer.init_state()
            self.optimizers.append(optimizer)
            for group in optimizer.param_groups:
                logger.info("MARSM (model part %d): %d params, use_marsm=%s, lr=%s",
                            len(self.optimizers) - 1, len(group["params"]), group["use_marsm"], group["lr"])
        self._validate_params(all_params)
        self._post_init(all_params)
        self._reported = False

    def step(self, closure: Any = None) -> Any:
        """Step every part's MARSM; after the first step, log what this rank's share was (the
        figures of any step: ``marsm_dist.step_stats(optimizers)``)."""
        loss = super().step(closure)
        if not self._reported:
            self._reported = True
            stats = step_stats(self)
            if stats is not None:
                logger.info("MARS-M step 1 on this rank: orthogonalized %d of %d sharded matrices, sent "
                            "%.2f MB, received %.2f MB", stats.owned_matrices, stats.sharded_matrices,
                            stats.bytes_sent / 1e6, stats.bytes_received / 1e6)
        return loss


def _marsm_options() -> list[str]:
    """The Config fields that are ``MARSM`` constructor arguments."""
    return [o.name for o in CONFIG_OPTIONS]


@override(target=OptimizersContainer.Config, description="MARS-M (marsm_dist) as the optimizer")
def marsm(config: OptimizersContainer.Config, **options: Any) -> MARSMContainer.Config:
    """torchtitan override: the job's optimizer config becomes a :class:`MARSMContainer.Config`.

    Usage: ``--override.imports marsm_dist.adapters.torchtitan.marsm`` on the torchtitan launch
    line, with MARS-M options as JSON if wanted:
    ``--override.imports 'marsm_dist.adapters.torchtitan.marsm={"lr": 3e-3, "gamma": 0.05}'``.

    lr, weight_decay, betas and eps are taken from the replaced config's last (catch-all)
    param group; ``options`` (any :class:`MARSMContainer.Config` field) win over them.
    """
    if isinstance(config, MARSMContainer.Config):
        return replace(config, **options)
    inherited: dict[str, Any] = {}
    if config.param_groups:
        if len(config.param_groups) > 1:
            logger.warning("MARS-M replaces %d optimizer param groups with its own routing; it takes lr, "
                           "weight_decay, betas and eps from the last one (pattern %r)",
                           len(config.param_groups), config.param_groups[-1].pattern)
        kwargs = config.param_groups[-1].optimizer_kwargs
        inherited = {ours: kwargs[theirs] for theirs, ours in _FROM_ADAMW.items() if theirs in kwargs}
        if "adamw_betas" in inherited:
            inherited["adamw_betas"] = tuple(inherited["adamw_betas"])
    return MARSMContainer.Config(implementation=config.implementation, **{**inherited, **options})
