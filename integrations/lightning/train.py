"""Train a small GPT with MARS-M in PyTorch Lightning, sharded with FSDP2 or replicated with DDP.

    python integrations/lightning/train.py --strategy fsdp2 --devices 2 --max-steps 200
    # after an interruption: the same command, from the last checkpoint
    python integrations/lightning/train.py --strategy fsdp2 --devices 2 --max-steps 200 \
        --resume runs/lightning/step=100.ckpt

Lightning starts the other ranks itself (it runs this script again once per extra device);
under torchrun or Slurm it takes theirs. What is specific to MARS-M:

- ``configure_optimizers`` builds ``MARSM(param_groups(self), ...)``: hidden matrices get MARS-M,
  embeddings, the head, norms and biases the AdamW branch.
- FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): the parameters are
  DTensors and MARSM shards the Newton-Schulz work by itself, one owner rank per matrix.
- DDP: pass ``process_group=torch.distributed.group.WORLD`` so the replicated matrices also get
  one owner rank each, instead of every rank orthogonalizing every matrix.
- ``marsm_dist.step_stats(optimizer)`` shows the sharding: matrices each rank owned, bytes it moved.

Checkpoints are Lightning's own (``ModelCheckpoint``, ``ckpt_path=``): a DCP directory under
FSDP2, one file under DDP. The data loader is stateful, so a resumed run continues with the next
batch rather than restarting the epoch. The model and data are in ``model.py``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from model import TinyGPT, token_batch  # model.py, beside this script
from torch import Tensor
from torch.distributed.fsdp import fully_shard

from marsm_dist import MARSM, param_groups, step_stats
from marsm_dist.shutdown import run_and_exit

VOCAB, HEADS, SEQ_LEN = 64, 2, 16
EPOCH_BATCHES = 10_000  # global batches in one pass over the (synthetic) data
STAT_FIELDS = ("owned_matrices", "bytes_sent", "bytes_received")


class TokenBatches:
    """This rank's rows of the global batches 0, 1, 2, ...: the same global batches at any world size.

    Lightning saves ``state_dict()`` in each checkpoint and calls ``load_state_dict()`` before it
    iterates again, so a resumed run takes the next batch instead of restarting the epoch (a plain
    ``DataLoader`` cannot say where it was; with real data, torchdata's ``StatefulDataLoader``
    plays this part). ``__len__`` matters too: with a length Lightning fetches no batch ahead, so
    the position saved is exactly the number of batches trained on.
    """

    def __init__(self, batches: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is not divisible by {world} data-parallel ranks")
        self.batches, self.batch_size, self.seed = batches, batch_size, seed
        per_rank = batch_size // world
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self.position = 0  # the next global batch (within the epoch)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.position >= self.batches:  # the previous epoch ran to its end
            self.position = 0
        while self.position < self.batches:
            x, y = token_batch(self.seed, self.position, self.batch_size, SEQ_LEN, VOCAB)
            self.position += 1
            yield x[self.rows], y[self.rows]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


class GPTModule(L.LightningModule):
    """TinyGPT trained with MARS-M; records each step's loss and MARSM's sharding figures."""

    def __init__(self, lr: float, max_steps: int, batch_size: int, seed: int, ns_dtype: str,
                 d_model: int, layers: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyGPT(VOCAB, d_model, layers, HEADS, SEQ_LEN)
        self.history: list[dict[str, Any]] = []  # this rank's loss and figures, one entry per step
        self.summary: list[dict[str, Any]] = []  # every rank's, after training (rank 0)

    def configure_model(self) -> None:
        # ModelParallelStrategy sets the device mesh before calling this; under DDP it is None.
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def train_dataloader(self) -> TokenBatches:
        # The data-parallel coordinates (not the global rank: with tensor parallelism they differ).
        where = self.trainer.strategy.distributed_sampler_kwargs
        return TokenBatches(EPOCH_BATCHES, self.hparams.batch_size, self.hparams.seed, where["rank"],
                            where["num_replicas"])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(*batch)
        self.log("loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        groups = param_groups(self)
        self.marsm_matrices = sum(len(g["params"]) for g in groups if g["use_marsm"])
        # DDP's parameters are plain tensors, replicated over the world: with that group MARSM gives
        # each matrix one owner rank for Newton-Schulz. FSDP2's DTensors carry their own mesh.
        replicated = dist.group.WORLD if isinstance(self.trainer.strategy, DDPStrategy) else None
        opt = MARSM(groups, lr=self.hparams.lr, weight_decay=0.1, ns_dtype=self.hparams.ns_dtype,
                    process_group=replicated)
        # cycle_momentum=False: OneCycleLR would otherwise cycle the group's "momentum", which is
        # MARS-M's matrix momentum, not an Adam beta.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, cycle_momentum=False,
                                                    total_steps=self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # This rank's figures, kept here: no collective per step (they are gathered once, at the
        # end). step_stats finds MARSM inside Lightning's optimizer wrapper.
        stats = step_stats(self.optimizers())
        self.history.append({"step": self.global_step, "loss": outputs["loss"].item(),
                             **{f: getattr(stats, f) for f in STAT_FIELDS}})

    def on_train_end(self) -> None:
        everyone = [self.history]
        if dist.is_initialized():
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, self.history)
        # One row per step: the global batch's loss (the ranks' shares are equal) and each rank's figures.
        self.summary = [{"step": rows[0]["step"], "loss": sum(r["loss"] for r in rows) / len(rows),
                         "ranks": [{f: r[f] for f in STAT_FIELDS} for r in rows]}
                        for rows in zip(*everyone, strict=True)]
        if self.global_rank != 0 or not self.summary:
            return
        last = self.summary[-1]
        print(f"MARS-M matrices: {self.marsm_matrices}; step {last['step']} loss {last['loss']:.4f}")
        for rank, figures in enumerate(last["ranks"]):
            print(f"  rank {rank}: owns {figures['owned_matrices']} matrices, sent "
                  f"{figures['bytes_sent']:,} B, received {figures['bytes_received']:,} B per step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line (``--help`` shows the launch lines above)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", choices=("fsdp2", "ddp"), default="fsdp2")
    p.add_argument("--devices", type=int, default=2, help="ranks per node")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    p.add_argument("--max-steps", type=int, default=200,
                   help="length of the run (and of the lr schedule: keep it when resuming)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch, split over the ranks")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-2, help="peak learning rate (one-cycle schedule)")
    p.add_argument("--ns-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="Newton-Schulz dtype; float32 for reproducible trajectories")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt-dir", default="runs/lightning", help="where checkpoints go")
    p.add_argument("--ckpt-every", type=int, default=100, help="save a checkpoint every N steps")
    p.add_argument("--resume", default=None, metavar="PATH", help="checkpoint to resume from")
    p.add_argument("--log-json", default=None, metavar="PATH",
                   help="rank 0 writes each step's loss and every rank's MARS-M sharding figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the strategy, module and trainer; fit (or resume); write the JSON log."""
    args = parse_args(argv)
    L.seed_everything(args.seed)  # every rank builds the same initial weights
    ranks = args.devices * args.num_nodes
    if args.strategy == "fsdp2":  # all ranks data-parallel: FSDP2 only, no tensor parallelism
        strategy = ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1)
    else:
        strategy = DDPStrategy()
    module = GPTModule(args.lr, args.max_steps, args.batch_size, args.seed, args.ns_dtype,
                       args.d_model, args.layers)
    checkpoints = ModelCheckpoint(dirpath=args.ckpt_dir, filename="{step}", save_top_k=-1,
                                  every_n_train_steps=args.ckpt_every)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                        strategy=strategy, max_steps=args.max_steps,
                        gradient_clip_val=1.0,  # as in the paper's recipes
                        callbacks=[checkpoints], logger=False,  # add yours (TensorBoard, W&B, ...)
                        enable_model_summary=False)
    trainer.fit(module, ckpt_path=args.resume)
    if args.log_json and trainer.global_rank == 0:
        Path(args.log_json).write_text(json.dumps({
            "strategy": args.strategy, "world_size": trainer.world_size,
            "marsm_matrices": module.marsm_matrices, "steps": module.summary}, indent=1))


if __name__ == "__main__":
    # Exit code 0 after a success, 1 with the traceback after a failure. It ends with barrier,
    # destroy_process_group and os._exit: torch 2.13's gloo ranks otherwise abort now and then at
    # interpreter exit, after training succeeded (see marsm_dist/shutdown.py).
    run_and_exit(main)
