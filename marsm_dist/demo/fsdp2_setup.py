"""The demo model sharded with FSDP2 (``fully_shard``), and its optimizer."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .dist_env import DistEnv
from .model import TinyGPT
from .optimizers import build_optimizer
from .train import Config


class FSDP2Stepper:
    """Forward, backward and step of a ``fully_shard``-ed TinyGPT (gradients are reduced in backward);
    a :class:`~.stepper.Stepper`."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        torch.manual_seed(cfg.seed)  # every rank builds the same full model, then keeps its rows
        model = TinyGPT(cfg.d_model, cfg.layers, cfg.heads, cfg.seq_len).to(env.device)
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root takes the embeddings, the tied head and ln_f
        self.model = model
        self.n_params = sum(p.numel() for p in model.parameters())  # DTensors report the full size
        self.opt = build_optimizer(cfg, model)
        self.param_groups = self.opt.param_groups
        self.data_parallel = (env.rank, env.world_size)  # every rank is a data-parallel rank

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-byte cross-entropy of this rank's slice."""
        return self.model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward; FSDP2 reduce-scatters the gradients into the shards."""
        loss.backward()

    def step(self) -> None:
        """One optimizer step."""
        self.opt.step()

    def zero_grad(self) -> None:
        """Clear the gradients."""
        self.opt.zero_grad()

    def store_lookahead(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """MARS-M exact mode: the gradient of the next batch at the current weights."""
        self.model(x, y).backward()
        self.opt.store_lookahead_grad()
        self.opt.zero_grad()
