"""The demo model in a DeepSpeed engine, with the optimizer named in the JSON config.

MARS-M comes from ``"optimizer": {"type": "MARSM"}`` (made known to DeepSpeed by importing
``marsm_dist.adapters.deepspeed``), AdamW from DeepSpeed's ``"AdamW"`` with ``torch_adam`` (no
FusedAdam JIT build), and Muon from DeepSpeed's own ``"Muon"`` type: ZeRO hands the optimizer
flat 1-D partitions, which torch.optim.Muon cannot take. DeepSpeed's Muon scales its update by
sqrt(max(1, rows/cols)) rather than 0.2*sqrt(max(rows, cols)), and uses Nesterov momentum, so
its lr is not comparable one-to-one with the FSDP2 run's.
"""

from __future__ import annotations

import os

import torch

from .dist_env import DistEnv
from .model import TinyGPT
from .train import Config


def ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config for ``cfg``: fp32, no clipping (like the FSDP2 path), ZeRO ``cfg.zero_stage``."""
    lr, wd = cfg.peak_lr, cfg.weight_decay
    optimizer = {
        "marsm": {"type": "MARSM", "params": {"lr": lr, "weight_decay": wd, "ns_dtype": cfg.ns_dtype,
                                              "adamw_betas": [0.9, 0.95], **cfg.marsm_kwargs}},
        "adamw": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": wd,
                                              "torch_adam": True}},
        "muon": {"type": "Muon", "params": {"lr": lr, "betas": [0.9, 0.95], "weight_decay": wd,
                                            "torch_adam": True}},
    }[cfg.optimizer]
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.optimizer == "muon" and cfg.zero_stage == 3:
        zero["reduce_scatter"] = False  # DeepSpeed refuses Muon with ZeRO-3's reduce-scatter
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        # DeepSpeed clips at 1.0 unless told otherwise; the FSDP2 path does not clip.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        "optimizer": optimizer,
        "steps_per_print": 10**9,
    }


class DeepSpeedStepper:
    """Forward, backward and step through ``deepspeed.initialize``'s engine; a :class:`~.stepper.Stepper`."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        if env.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's accelerator probe
        import deepspeed

        import marsm_dist.adapters.deepspeed  # noqa: F401  (makes "type": "MARSM" known to DeepSpeed)

        deepspeed.init_distributed()  # adopts the process group that is already up
        torch.manual_seed(cfg.seed)
        model = TinyGPT(cfg.d_model, cfg.layers, cfg.heads, cfg.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())  # counted before ZeRO partitions them
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                    config=ds_config(cfg, env.world_size))
        self.param_groups = self.engine.optimizer.param_groups
        self.data_parallel = (env.rank, env.world_size)  # every rank is a data-parallel rank

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-byte cross-entropy of this rank's slice."""
        return self.engine(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through the engine (ZeRO reduces gradient partitions here)."""
        self.engine.backward(loss)

    def step(self) -> None:
        """``engine.step()``: the optimizer on this rank's partition, then the parameter all-gather."""
        self.engine.step()

    def zero_grad(self) -> None:
        """The engine clears gradients inside ``step``."""

    def store_lookahead(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Not possible under DeepSpeed (refused up front by the command line)."""
        raise NotImplementedError("MARS-M's exact mode is not available with --framework deepspeed")
