"""DeepSpeed engines saving and loading MARS-M's state outside their own same-shape checkpoints.

* The neutral form (:mod:`marsm_dist.checkpoint`): ZeRO-3 lists MARSM's fp32 partitions in
  ``param_groups`` only inside a step (and its own ``save_checkpoint``); :func:`zero3_view` lists
  them while the neutral form walks them. ZeRO-1/2 and the BF16_Optimizer keep them listed.
* Universal checkpoints (``"checkpoint": {"load_universal": true}``, written from a ZeRO
  checkpoint by ``python -m marsm_dist.checkpoint convert ... --to deepspeed-universal``):
  :func:`patch_universal_loading` makes ZeRO-3 read every MARS-M state key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..optimizer import MARSM

__all__ = ["load_stage3_universal", "master_sync", "patch_universal_loading", "stage3_fp32_to_model",
           "zero3_view"]


@contextlib.contextmanager
def _all_partitions_listed(wrapper: Any) -> Iterator[None]:
    wrapper._set_fp32_optimizer_param_groups()
    try:
        yield
    finally:
        wrapper._clear_fp32_optimizer_param_groups()


def zero3_view(wrapper: Any) -> contextlib.AbstractContextManager[None] | None:
    """ZeRO-3 hands MARSM its fp32 partitions only inside a step (and its own checkpointing):
    the neutral checkpoint walks the partitions inside this view (None for other wrappers)."""
    if isinstance(getattr(wrapper, "optimizer", None), MARSM) and hasattr(
            wrapper, "_set_fp32_optimizer_param_groups") and not any(
            g["params"] for g in wrapper.optimizer.param_groups):
        return _all_partitions_listed(wrapper)
    return None


def _saved_keys(folders: list[str]) -> list[str]:
    """The state keys every parameter of a sub-group saved (``fp32`` included, ``step`` apart)."""
    found = [{f[:-3] for f in os.listdir(d) if f.endswith(".pt")} for d in folders]
    return sorted(set.intersection(*found) - {"step"}) if found else []


def load_stage3_universal(wrapper: Any, checkpoint_dir: str) -> None:
    """ZeRO-3's universal load for MARSM: every saved state key (DeepSpeed's own reads only
    ``fp32``, ``exp_avg`` and ``exp_avg_sq``), the step from ``step.pt``, and each param group's
    own hyperparameters (DeepSpeed's gives every group the first group's)."""
    if getattr(wrapper, "swap_optimizer", False):
        raise NotImplementedError("universal checkpoints with NVMe-swapped MARSM state are not supported")
    zero = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(zero, "optimizer_state.pt"), weights_only=False)
    wrapper._load_global_state_stage3(optim_sd)
    opt = wrapper.optimizer
    saved_groups = optim_sd["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"{checkpoint_dir} has {len(saved_groups)} param groups, this MARSM "
                         f"{len(opt.param_groups)}: build the optimizer from the same config")
    for sub_group, params in enumerate(wrapper.fp16_groups):
        flat = wrapper.fp32_partitioned_groups_flat[sub_group]
        folders = [os.path.join(zero, wrapper.param_names[p]) for p in params]
        absent = [f for f in folders if not os.path.isdir(f)]
        if absent:
            raise ValueError(f"{checkpoint_dir} has no state for {absent[:3]}: another model's checkpoint")
        state: dict[str, Any] = {}
        for key in _saved_keys(folders):
            buf, offset = torch.zeros_like(flat), 0
            for p, folder in zip(params, folders, strict=True):
                part = wrapper.load_hp_checkpoint_state(folder, key, param=p)  # this rank's chunk
                buf.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if key == "fp32":
                flat.data.copy_(buf)
            else:
                state[key] = buf
        step_file = os.path.join(folders[0], "step.pt") if folders else ""
        if os.path.isfile(step_file):
            state["step"] = torch.load(step_file, weights_only=False)
        opt.state[flat] = state
    for group, saved in zip(opt.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    stage3_fp32_to_model(wrapper)
    opt.note_state_loaded()


def stage3_fp32_to_model(wrapper: Any) -> None:
    """ZeRO-3: copy each sub-group's fp32 partition to the model's partitioned (bit16) parameters."""
    for sub_group, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
        if flat.numel():
            wrapper.fp16_partitioned_groups_flat[sub_group].data.copy_(flat.data)
        updated = wrapper.unflatten(wrapper.fp16_partitioned_groups_flat[sub_group],
                                    wrapper.fp16_partitioned_groups[sub_group])
        for partitioned, q in zip(wrapper.fp16_partitioned_groups[sub_group], updated, strict=True):
            partitioned.data = q.data


def master_sync(wrapper: Any) -> Callable[[], None] | None:
    """After ``load_neutral(weights=True)`` wrote the fp32 partitions: the model's bit16 copies
    follow them (ZeRO-3: its partitions; ZeRO-1/2 and the BF16_Optimizer: copied and all-gathered
    by DeepSpeed's ``update_lp_params``). None for another wrapper."""
    if not isinstance(getattr(wrapper, "optimizer", None), MARSM):
        return None
    if hasattr(wrapper, "fp32_partitioned_groups_flat"):
        return lambda: stage3_fp32_to_model(wrapper)
    return getattr(wrapper, "update_lp_params", None)


def patch_universal_loading() -> None:
    """Make DeepSpeed's universal loading carry MARS-M's state (idempotent; other optimizers
    keep DeepSpeed's own code): ZeRO-3 gets :func:`load_stage3_universal`; ZeRO-1/2, which already
    load every saved key, screen the loaded state at the next step."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(DeepSpeedZeroOptimizer_Stage3, "_marsm_universal", False):
        return
    stage3 = DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3
    stage12 = DeepSpeedZeroOptimizer._load_universal_checkpoint

    def load3(self, checkpoint_dir):
        if isinstance(self.optimizer, MARSM):
            return load_stage3_universal(self, checkpoint_dir)
        return stage3(self, checkpoint_dir)

    def load12(self, *args, **kwargs):
        out = stage12(self, *args, **kwargs)
        if isinstance(self.optimizer, MARSM):
            self.optimizer.note_state_loaded()
        return out

    DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = load3
    DeepSpeedZeroOptimizer._load_universal_checkpoint = load12
    DeepSpeedZeroOptimizer_Stage3._marsm_universal = True
