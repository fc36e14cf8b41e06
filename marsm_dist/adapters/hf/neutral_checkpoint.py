"""Move a Hugging Face ``Trainer`` run between frameworks and world sizes with its MARS-M state.

``Trainer(..., callbacks=[MARSMCheckpointCallback()])`` is the whole setup; then
``trainer.train(resume_from_checkpoint=ckpt)`` continues from a checkpoint written under DeepSpeed
ZeRO, FSDP2 (Accelerate) or plain DDP, under any of them, at any world size (see the class).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ...checkpoint import MANIFEST, load_neutral, read_manifest, save_neutral
from ...checkpoint.held import strip_wrappers
from ...checkpoint.neutral import distributed

__all__ = ["NEUTRAL_DIR", "MARSMCheckpointCallback", "install"]

logger = logging.getLogger(__name__)

#: The folder of a Trainer checkpoint that holds MARS-M's state in the neutral form.
NEUTRAL_DIR = "marsm_state"
# The Trainer's and Accelerate's file names (transformers.trainer keeps them as private constants).
WEIGHTS, WEIGHTS_INDEX, SCHEDULER = "model.safetensors", "model.safetensors.index.json", "scheduler.pt"
_WEIGHT_FILES = (WEIGHTS, WEIGHTS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
_FSDP_MODEL, _OPTIMIZER = "pytorch_model_fsdp", "optimizer.pt"
_MODES = ("auto", "neutral", "native")


class MARSMCheckpointCallback(TrainerCallback):
    """Make the Trainer's checkpoints portable between frameworks: ``callbacks=[MARSMCheckpointCallback()]``.

    The limitation it works around: a Trainer checkpoint holds the optimizer state in the running
    framework's own files (DeepSpeed's ``global_step*/`` ZeRO partitions, Accelerate's FSDP
    ``optimizer_0/``, DDP's ``optimizer.pt``), readable only by the same framework, and for ZeRO
    only at the same world size and stage. Resuming under another one fails (DeepSpeed: "Can't
    find a valid checkpoint"; FSDP: no ``pytorch_model_fsdp_0``; DDP refuses FSDP checkpoints) or,
    where the optimizer files are merely absent, restarts the optimizer from zero without a word.

    At every save (``on_save``; collective, every rank takes part) it adds to
    ``<output_dir>/checkpoint-<step>/``: ``marsm_state/``, MARS-M's state in the neutral form
    (:func:`marsm_dist.checkpoint.save_neutral`, keyed by the model's parameter names) with the
    parameters it steps (``weights=True``: ZeRO's fp32 masters under mixed precision);
    ``model.safetensors``, the full weights, when the framework wrote none (ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save``, FSDP with a sharded state dict); and
    ``scheduler.pt`` when the framework keeps the schedule in its own files (DeepSpeed).

    Constructing it installs one hook, once per process (:func:`install`): ``Trainer.
    _prepare_for_training``, where the Trainer builds the optimizer, wraps the model and loads a
    checkpoint. For a Trainer carrying this callback that resumes from a checkpoint whose
    optimizer state is not the current framework's (``resume="auto"``: no native files this
    framework reads, or a different world size in ``marsm_state``), it loads the full weights into the
    model *before* DeepSpeed or FSDP2 wrap it, lets the Trainer build and wrap everything with no
    checkpoint (so no native loader runs), then loads MARS-M's state and the master weights with
    :func:`~marsm_dist.checkpoint.load_neutral`, the scheduler and the grad scaler. The Trainer
    restores the rest as always: global step, data position, RNG files (per rank, where the rank
    exists in the checkpoint). Other Trainers, and other checkpoints, take the Trainer's own path.

    Args:
        resume: ``"auto"`` (above), ``"neutral"`` (always resume from ``marsm_state``) or
            ``"native"`` (always the Trainer's own path; the callback then only writes).

    The checkpoint folder must be on a file system every rank reads.
    """

    def __init__(self, *, resume: str = "auto") -> None:
        if resume not in _MODES:
            raise ValueError(f"resume must be one of {_MODES}, not {resume!r}")
        self.resume = resume
        install()

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                lr_scheduler: Any = None, **kwargs: Any) -> None:
        """Add MARS-M's neutral state, and the full weights and schedule if missing (collective)."""
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # Rank 0 wrote the Trainer's files before reaching this point; the others may see them late.
        there = [os.path.isfile(os.path.join(path, n)) for n in (*_WEIGHT_FILES, SCHEDULER)]
        have_weights, have_schedule = _agreed([any(there[:-1]), there[-1]])
        if not have_weights:
            weights = full_weights(model)
            if weights is not None:
                _write_weights(weights, path)
        if not have_schedule and lr_scheduler is not None and _rank() == 0:
            torch.save(lr_scheduler.state_dict(), os.path.join(path, SCHEDULER))
        # weights=True: the parameters MARS-M steps travel too, as the fp32 masters where DeepSpeed
        # keeps them (model.safetensors holds its 16-bit copies under mixed precision).
        save_neutral(optimizer, os.path.join(path, NEUTRAL_DIR), model=model, weights=True)


# ------------------------------------------------------------------------------- saving helpers
def _rank() -> int:
    return dist.get_rank() if distributed() else 0


def _agreed(values: list[Any]) -> list[Any]:
    """Rank 0's ``values`` on every rank (a decision every rank must take alike)."""
    if distributed():
        dist.broadcast_object_list(values, src=0)
    return values


@contextlib.contextmanager
def _whole(t: torch.Tensor, modifier_rank: int | None = None) -> Iterator[torch.Tensor]:
    """``t`` whole inside the block: a ZeRO-3 parameter gathered (collective), else as it is.
    With ``modifier_rank``, rank ``modifier_rank``'s writes are partitioned back on exit."""
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=modifier_rank):
            yield t
    else:
        yield t


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The model's full state dict on rank 0 (None elsewhere), gathered one tensor at a time from
    FSDP2's DTensors or ZeRO-3's partitions (collective). A tied tensor is kept once, under its
    first name, as ``save_pretrained`` keeps it."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, DTensor):
            full = t.full_tensor()
        else:
            with _whole(t):
                full = t.detach().clone()
        out[strip_wrappers(name)] = full.detach().cpu().contiguous()
    return out if _rank() == 0 else None


def _write_weights(weights: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    tmp = os.path.join(path, WEIGHTS + ".tmp")
    save_file(weights, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, WEIGHTS))  # never a half-written model.safetensors


# ------------------------------------------------------------------------------- loading helpers
def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        files = [WEIGHTS]
    else:
        raise ValueError(f"{path} holds no {WEIGHTS}: the full weights a move to another framework needs "
                         f"(MARSMCheckpointCallback writes them at each save)")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(os.path.join(path, name)))
    return weights


@torch.no_grad()
def load_full_weights(model: torch.nn.Module, path: str) -> None:
    """Copy the checkpoint's full weights into ``model`` before any framework wraps it: plain
    tensors, or ZeRO-3 partitioned ones (``zero.Init``; gathered one at a time, collective)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise NotImplementedError("the model is sharded already (DTensor parameters): resume from the "
                                  "neutral form with a Trainer given the unsharded model")
    weights, loaded, missing = _read_weights(path), set(), []
    for name, t in model.state_dict(keep_vars=True).items():
        key = strip_wrappers(name)
        if key not in weights:
            if id(t) not in loaded:  # a tied tensor is loaded once, under the name it was saved by
                missing.append(key)
            continue
        with _whole(t, modifier_rank=0):
            t.data.copy_(weights[key])
        loaded.add(id(t))
    if missing:
        raise ValueError(f"{path}/{WEIGHTS} lacks {len(missing)} of the model's tensors: {missing[:5]}")


def _load_scheduler(trainer: Any, path: str) -> None:
    """The saved schedule into the Trainer's scheduler, and its current lr into the param groups
    (the optimizer's own ``load_state_dict`` would have restored those)."""
    file = os.path.join(path, SCHEDULER)
    if not os.path.isfile(file):
        warnings.warn(f"{path} has no {SCHEDULER}: the learning-rate schedule restarts", stacklevel=2)
        return
    saved = torch.load(file, weights_only=True)
    inner = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)  # Accelerate's wrapper
    mine = inner.state_dict()
    groups = inner.optimizer.param_groups
    if set(saved) != set(mine) or not _fit_groups(saved, len(groups)):
        warnings.warn(f"{file} is another scheduler's state: the learning-rate schedule restarts",
                      stacklevel=2)
        return
    inner.load_state_dict(saved)
    for group, lr in zip(groups, inner.get_last_lr(), strict=True):
        group["lr"] = lr


def _fit_groups(saved: dict[str, Any], groups: int) -> bool:
    """Make a schedule saved over another number of param groups fit: possible when every group
    had one lr (MARS-M's groups do, frameworks split them differently)."""
    for key in ("base_lrs", "_last_lr"):
        values = saved.get(key)
        if isinstance(values, list) and len(values) != groups:
            if len(set(values)) != 1:
                return False
            saved[key] = values[:1] * groups
    return True


# ------------------------------------------------------------------------------- the resume hook
def _native_optimizer_files(trainer: Any, path: str) -> bool:
    """Whether ``path`` holds the optimizer state in the current framework's own files."""
    entries = os.listdir(path)
    if trainer.is_deepspeed_enabled:  # ZeRO-3 reads its own model files only (ZeRO-2's: AssertionError)
        from transformers.integrations import is_deepspeed_zero3_enabled

        zero3 = is_deepspeed_zero3_enabled()
        model_states = "zero_pp_rank_*_model_states.pt" if zero3 else "mp_rank_*_model_states.pt"
        return bool(glob.glob(os.path.join(path, "global_step*", model_states)))
    if trainer.is_fsdp_enabled:  # Accelerate: pytorch_model_fsdp_0/ + optimizer_0/ (or .bin files)
        return (any(e.startswith(_FSDP_MODEL) for e in entries)
                and any(e.startswith("optimizer") and e != _OPTIMIZER for e in entries))
    return _OPTIMIZER in entries


def neutral_resume_path(trainer: Any, checkpoint: str | None) -> str | None:
    """The ``marsm_state`` folder ``trainer`` resumes from, or None for the Trainer's own path
    (no :class:`MARSMCheckpointCallback`, no checkpoint, or the checkpoint is this framework's)."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, MARSMCheckpointCallback)),
                    None)
    if callback is None or checkpoint is None or callback.resume == "native":
        return None
    neutral = os.path.join(checkpoint, NEUTRAL_DIR)
    complete = os.path.isfile(os.path.join(neutral, MANIFEST))
    if callback.resume == "auto" and _native_optimizer_files(trainer, checkpoint):
        if not complete or read_manifest(neutral)["world_size"] == trainer.args.world_size:
            return None
    if not complete:
        raise ValueError(f"{checkpoint} holds neither this framework's optimizer state nor a complete "
                         f"{NEUTRAL_DIR}/ (MARS-M's state in the neutral form): resuming would restart "
                         f"MARS-M from zero. Save with MARSMCheckpointCallback in the run you resume.")
    return neutral


def install() -> None:
    """Wrap ``Trainer._prepare_for_training`` (and ``_load_from_checkpoint``, which DDP runs first)
    so that Trainers carrying :class:`MARSMCheckpointCallback` resume from the neutral form when
    the checkpoint is another framework's (idempotent; other Trainers are untouched)."""
    from transformers import trainer as hf_trainer

    cls = hf_trainer.Trainer
    if not hasattr(cls, "_prepare_for_training"):  # the hook point; transformers 5.24 is tested
        raise RuntimeError("MARSMCheckpointCallback needs Trainer._prepare_for_training (transformers 5)")
    if getattr(cls._prepare_for_training, "_marsm_neutral", False):
        return
    prepare, load_from_checkpoint = cls._prepare_for_training, cls._load_from_checkpoint

    @functools.wraps(prepare)
    def _prepare_for_training(self: Any, max_steps: Any, train_dataloader: Any, resume_from_checkpoint: Any):
        neutral = neutral_resume_path(self, resume_from_checkpoint)
        if neutral is None:
            return prepare(self, max_steps, train_dataloader, resume_from_checkpoint)
        load_full_weights(self.model, resume_from_checkpoint)  # before DeepSpeed or FSDP2 shard it
        model, train_dataloader = prepare(self, max_steps, train_dataloader, None)  # no native loader
        masters = bool(read_manifest(neutral).get("weights"))  # over model.safetensors' copies
        load_neutral(self.optimizer, neutral, model=self.model, weights=masters)
        _load_scheduler(self, resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        logger.info("MARS-M: resumed from %s in the neutral form", neutral)
        return model, train_dataloader

    @functools.wraps(load_from_checkpoint)
    def _load_from_checkpoint(self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
        # train() loads a DDP run's weights here, before the hook above; it would refuse an FSDP
        # checkpoint, and the hook loads the weights anyway.
        if model is None and neutral_resume_path(self, resume_from_checkpoint) is not None:
            return
        load_from_checkpoint(self, resume_from_checkpoint, model)

    _prepare_for_training._marsm_neutral = True  # type: ignore[attr-defined]
    cls._prepare_for_training, cls._load_from_checkpoint = _prepare_for_training, _load_from_checkpoint
