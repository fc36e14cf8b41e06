"""The three optimizers the demo compares, built on a model's (possibly FSDP2-sharded) parameters."""

from __future__ import annotations

import torch

from .. import MARSM, param_groups
from .train import Config


class Chain:
    """Several optimizers stepped together (Muon for the matrices + AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]

    def step(self) -> None:
        """Step every optimizer."""
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        """Clear every optimizer's gradients."""
        for o in self.opts:
            o.zero_grad()


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer | Chain:
    """``cfg.optimizer`` with its peak lr and the shared weight decay.

    The matrix/other split is ``param_groups``' for all three (embeddings and the tied head go
    to the AdamW branch), so MARS-M and Muon orthogonalize exactly the same tensors. Under FSDP2
    torch.optim.Muon runs Newton-Schulz on DTensors, so each of its matmuls gathers what it needs
    on every rank; MARS-M gathers each matrix to one owner rank instead.
    """
    lr = cfg.peak_lr
    if cfg.optimizer == "marsm":
        return MARSM(param_groups(model), lr=lr, weight_decay=cfg.weight_decay,
                     ns_dtype=cfg.ns_dtype, approx=cfg.mode == "approx", **cfg.marsm_kwargs)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        matrix, other = param_groups(model, named=False)
        return Chain(
            torch.optim.Muon(matrix["params"], lr=lr, weight_decay=cfg.weight_decay,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(other["params"], lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay),
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected marsm, muon or adamw)")
