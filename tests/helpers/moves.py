"""Runs that stop under one framework and shape and continue under another, for the checkpoint
tests: each kind builds the ``awkward`` model from given full weights, trains on its share of the
global batch, and exports or imports MARS-M's state in the neutral form.

Kinds: ``ddp``, ``fsdp2``, ``fsdp2xtp`` (a 2x2 dp x tp mesh: W=4), ``ds-z0`` .. ``ds-z3``
(DeepSpeed from the JSON config; ``ds-z2-bf16``, ``ds-z3-bf16``: bf16 with fp32 master weights).
The weights travel as a plain full state dict, as a Hugging Face model's would; the optimizer
state travels in the neutral form only.
"""

from __future__ import annotations

import os

import torch

from marsm_dist import MARSM, param_groups
from marsm_dist.checkpoint import load_neutral, save_neutral
from tests.helpers import fsdp2_models as fm

NAME = "awkward"
LR = 0.02


def _model(weights: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    model = fm.build(NAME)
    if weights is not None:
        model.load_state_dict(weights)
    return model


def _deepspeed(rank: int, world_size: int, kind: str, model: torch.nn.Module, universal: bool = False):
    import deepspeed

    import marsm_dist.adapters.deepspeed  # noqa: F401

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    cfg = {"train_micro_batch_size_per_gpu": fm.GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": int(kind[4])}, "steps_per_print": 10**9,
           "bf16": {"enabled": kind.endswith("-bf16")},
           "optimizer": {"type": "MARSM", "params": {"lr": LR, "ns_dtype": "float32"}}}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


class Run:
    """One kind of run at one world size: ``train``, ``full_weights``, and what holds the state."""

    def __init__(self, kind: str, rank: int, world_size: int, weights=None, universal: bool = False) -> None:
        self.kind, self.model = kind, _model(weights)
        self.rank, self.world = rank, world_size
        if kind.startswith("ds-z"):
            self.engine = _deepspeed(rank, world_size, kind, self.model, universal)
            self.holder, self.forward = self.engine, self.engine
            return
        if kind == "fsdp2":
            fm.shard(self.model, world_size)
            self.forward = self.model
        elif kind == "fsdp2xtp":
            _, self.rank, self.world = fm.shard_fsdp_x_tp(self.model)
            self.forward = self.model
        elif kind == "ddp":
            self.forward = torch.nn.parallel.DistributedDataParallel(self.model)
        else:
            raise ValueError(kind)
        self.holder = MARSM(param_groups(self.model), lr=LR, ns_dtype=torch.float32)

    def train(self, steps: int, start: int = 0) -> None:
        lo, hi = self.rank * fm.GLOBAL_BATCH // self.world, (self.rank + 1) * fm.GLOBAL_BATCH // self.world
        for t in range(start, start + steps):
            x, y = fm.batch(NAME, t)
            loss = self.forward(x[lo:hi], y[lo:hi])
            if self.kind.startswith("ds-z"):
                self.engine.backward(loss)
                self.engine.step()
            else:
                loss.backward()
                self.holder.step()
                self.holder.zero_grad()

    def full_weights(self) -> dict[str, torch.Tensor]:
        if self.kind.startswith("ds-z"):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
                return {n: p.detach().clone().float() for n, p in self.model.named_parameters()}
        return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in self.model.named_parameters()}


def stop(rank: int, world_size: int, kind: str, path: str, steps: int, masters: bool = False) -> dict:
    """Train ``steps`` steps, then save the weights (rank 0) and the neutral optimizer state
    (``masters``: with the optimizer's fp32 master weights)."""
    run = Run(kind, rank, world_size)
    run.train(steps)
    weights = run.full_weights()
    if rank == 0:
        torch.save(weights, os.path.join(path, "weights.pt"))
    return save_neutral(run.holder, os.path.join(path, "optim"), model=run.model, weights=masters)


def resume(rank: int, world_size: int, kind: str, path: str, start: int, steps: int,
           optimizer_state: bool = True, masters: bool = False) -> dict:
    """Continue from ``stop``'s checkpoint for ``steps`` steps; also run the same kind and shape
    uninterrupted from the start, and return both final weights. ``optimizer_state=False``: the
    weights only (the control: fresh momentum)."""
    run = Run(kind, rank, world_size, torch.load(os.path.join(path, "weights.pt")))
    if optimizer_state:
        load_neutral(run.holder, os.path.join(path, "optim"), model=run.model, weights=masters)
    run.train(steps, start=start)
    straight = Run(kind, rank, world_size)
    straight.train(start + steps)
    return {"resumed": run.full_weights(), "straight": straight.full_weights()}


def stop_deepspeed(rank: int, world_size: int, kind: str, path: str, steps: int) -> None:
    """Train ``steps`` steps under DeepSpeed and save its own checkpoint (``engine.save_checkpoint``)."""
    run = Run(kind, rank, world_size)
    run.train(steps)
    run.engine.save_checkpoint(path, tag=f"global_step{steps}")


def resume_universal(rank: int, world_size: int, kind: str, path: str, start: int, steps: int) -> dict:
    """Load a universal checkpoint into a DeepSpeed engine of ``kind`` and continue; also run the
    same kind and shape uninterrupted."""
    run = Run(kind, rank, world_size, universal=True)
    run.engine.load_checkpoint(path)
    run.train(steps, start=start)
    straight = Run(kind, rank, world_size)
    straight.train(start + steps)
    return {"resumed": run.full_weights(), "straight": straight.full_weights()}


def resume_neutral(rank: int, world_size: int, kind: str, weights: str, path: str, start: int,
                   steps: int) -> dict:
    """Load weights and a neutral checkpoint (converted offline) into a run of ``kind``, continue."""
    run = Run(kind, rank, world_size, torch.load(weights))
    load_neutral(run.holder, path, model=run.model)
    run.train(steps, start=start)
    return {"resumed": run.full_weights()}


def stop_deepspeed_adamw(rank: int, world_size: int, path: str) -> None:
    """A ZeRO-2 run of DeepSpeed's own AdamW, saved: a checkpoint that is not MARS-M's."""
    import deepspeed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    model = _model(None)
    cfg = {"train_micro_batch_size_per_gpu": fm.GLOBAL_BATCH // world_size, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x, y = fm.batch(NAME, 0)
    lo, hi = rank * fm.GLOBAL_BATCH // world_size, (rank + 1) * fm.GLOBAL_BATCH // world_size
    engine.backward(engine(x[lo:hi], y[lo:hi]))
    engine.step()
    engine.save_checkpoint(path, tag="global_step1")
