"""The Trainer's way to build MARSM with MARS-M's routing, and the refusal of the way without it.

``Trainer(optimizer_cls_and_kwargs=(MARSM, {...}))`` builds ``MARSM(groups, **kwargs)`` from
the Trainer's two weight-decay groups: bare tensors, no names, no ``use_marsm``. MARSM would then
route by shape and give the 2-D token and position embeddings and the output head the MARS-M
update (measured on a tiny GPT-2: loss 4.76 against 3.18 at step 20). The Trainer calls anything
that is not an Optimizer class as a factory with the model instead (``factory()(model,
**kwargs)``), which is what :class:`MARSMForTrainer` is.

:func:`install` makes the Trainer refuse the first way: it wraps ``Trainer.create_optimizer`` to
check the MARSM it built. It imports ``transformers.trainer``, so it runs only once that is imported
anyway (see :mod:`marsm_dist.adapters.hf`), and ``MARSM``'s own constructor knows nothing of it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ...functional import takes_marsm
from ...optimizer import MARSM
from ...param_groups import DEFAULT_HEAD_NAMES, param_groups

__all__ = ["MARSMForTrainer", "install", "install_if_loaded", "refuse_unrouted_trainer_groups"]

logger = logging.getLogger(__name__)

WORKING_LINE = ('Trainer(..., optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": 2e-2}))  '
                "# from marsm_dist.adapters.hf import MARSMForTrainer")


class MARSMForTrainer:
    """Build ``MARSM`` for a Hugging Face ``Trainer`` from the model, with MARS-M's routing.

    Pass the class itself: ``Trainer(..., optimizer_cls_and_kwargs=(MARSMForTrainer, kwargs))``.
    The Trainer instantiates it and calls it with the model it is about to train (under FSDP2,
    before Accelerate shards it: MARSM picks up the sharded parameters at its first step). The
    kwargs are MARSM's (``lr``, ``weight_decay``, ``ns_dtype``, ...; the Trainer's
    ``learning_rate`` and ``weight_decay`` arguments do not reach a custom optimizer) plus the
    routing options of :func:`marsm_dist.param_groups` (``marsm``, ``adamw``, ``head_names``,
    ``experts``, ``marsm_options``, ``adamw_options``).

    ``process_group="auto"`` (default): when the parameters are plain tensors replicated over
    the job (the Trainer's DDP), each matrix gets one owner rank for Newton-Schulz (the world
    group); FSDP2's DTensors and DeepSpeed's partitions bring their own groups.
    """

    def __call__(self, model: nn.Module, *, marsm: Iterable[str] = (), adamw: Iterable[str] = (),
                 head_names: Iterable[str] = DEFAULT_HEAD_NAMES, experts: Iterable[str] = (),
                 marsm_options: Mapping[str, Any] | None = None,
                 adamw_options: Mapping[str, Any] | None = None,
                 process_group: Any = "auto", **options: Any) -> MARSM:
        """Return ``MARSM(param_groups(model, ...), **options)`` (see the class docstring)."""
        install_if_loaded()  # the Trainer is calling: refuse (MARSM, ...) in the next one too
        groups = param_groups(model, marsm=marsm, adamw=adamw, head_names=head_names, experts=experts,
                              marsm_options=marsm_options, adamw_options=adamw_options)
        if isinstance(process_group, str):
            if process_group != "auto":
                raise ValueError(f"Invalid process_group: {process_group!r} (expected 'auto', None "
                                 "or a torch.distributed process group)")
            process_group = _replicas_of(groups)
        return MARSM(groups, process_group=process_group, **options)


def _replicas_of(groups: list[dict[str, Any]]) -> Any:
    """The world group when the Trainer replicates plain parameters over it (DDP), else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if _deepspeed_in_use():
        return None  # DeepSpeed's adapter picks the group (ZeRO-0) or the partitions carry theirs
    params = [p for g in groups for _, p in g["params"]]
    if any(isinstance(p, DTensor) for p in params):
        return None  # DTensors (FSDP2 or TP already applied) hold their own groups
    logger.info("MARSM: plain parameters in a %d-process job: each matrix gets one owner rank "
                "(process_group=WORLD)", dist.get_world_size())
    return dist.group.WORLD


def _deepspeed_in_use() -> bool:
    """True when Accelerate runs this job under DeepSpeed. ``TrainingArguments`` sets
    ACCELERATE_USE_DEEPSPEED only while it builds Accelerate's state, so that state is asked too."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return True
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "PartialState", None), "_shared_state", None) or {}
    return str(shared.get("distributed_type", "")).endswith("DEEPSPEED")


def refuse_unrouted_trainer_groups(groups: list[dict[str, Any]]) -> None:
    """Refuse ``optimizer_cls_and_kwargs=(MARSM, ...)``: the Trainer's groups would send its
    embeddings and head (2-D) to MARS-M. Groups that say ``use_marsm`` are the user's choice."""
    if not any(takes_marsm(None, p.shape) for g in groups if g.get("use_marsm") is None for p in g["params"]):
        return
    raise TypeError(
        "MARSM was built by the Hugging Face Trainer from its own param groups, which carry no "
        "names and no 'use_marsm': its embeddings and output head (2-D) would take the MARS-M "
        "update instead of AdamW. Pass the factory, which routes them from the model:\n    "
        f"{WORKING_LINE}\n(or build MARSM from groups that set 'use_marsm': marsm_dist.param_groups(model))")


def _check_built(trainer: Any) -> None:
    """Refuse the MARSM that ``trainer.create_optimizer`` just built from its own groups: the
    ``optimizer_cls_and_kwargs`` route with the class (a factory builds from the model)."""
    chosen = getattr(trainer, "optimizer_cls_and_kwargs", None)
    cls = chosen[0] if chosen else None
    if not (isinstance(cls, type) and issubclass(cls, MARSM) and isinstance(trainer.optimizer, MARSM)):
        return
    try:
        refuse_unrouted_trainer_groups(trainer.optimizer.param_groups)
    except TypeError:
        trainer.optimizer = None  # not kept: a second create_optimizer would return it unchecked
        raise


def install() -> None:
    """Make ``transformers.Trainer.create_optimizer`` refuse a MARSM built from the Trainer's own
    param groups (idempotent). Imports ``transformers.trainer``."""
    from transformers import trainer as hf_trainer

    original = hf_trainer.Trainer.create_optimizer
    if getattr(original, "_marsm_checked", False):
        return

    @functools.wraps(original)
    def create_optimizer(self: Any, *args: Any, **kwargs: Any) -> Any:
        builds = self.optimizer is None  # otherwise the Trainer hands back what it was given
        optimizer = original(self, *args, **kwargs)
        if builds:
            _check_built(self)
        return optimizer

    create_optimizer._marsm_checked = True  # type: ignore[attr-defined]
    hf_trainer.Trainer.create_optimizer = create_optimizer


def install_if_loaded() -> None:
    """:func:`install`, if ``transformers.trainer`` is imported already (else nothing: importing it
    here would cost seconds for a process that may never build a Trainer)."""
    if "transformers.trainer" in sys.modules:
        install()
