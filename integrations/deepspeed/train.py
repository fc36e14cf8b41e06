"""Train a small byte-level GPT with DeepSpeed and MARS-M chosen in the JSON config.

    deepspeed --num_gpus 2 train.py --deepspeed_config zero2.json

(from this folder; or ``bash launch/deepspeed.sh`` from the repository). Copy this folder and
``pip install "marsm-dist[deepspeed]"``: nothing else is needed. The only MARS-M-specific line is
the ``marsm_dist.adapters.deepspeed`` import below; the rest is a plain DeepSpeed training loop.
``model.py`` beside it holds the model and the data (the Python standard library's source, as
bytes); replace them with yours.
"""

from __future__ import annotations

import argparse
import os
import time

import deepspeed
import torch
import torch.distributed as dist
from model import ByteGPT, rank_batch, stdlib_bytes  # model.py, beside this script

import marsm_dist.adapters.deepspeed  # noqa: F401  (makes "type": "MARSM" known to DeepSpeed)
from marsm_dist.shutdown import run_and_exit


def parse_args() -> argparse.Namespace:
    """Command line; ``--local_rank`` is appended by the deepspeed launcher."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    return p.parse_args()


def main() -> None:
    """Build the model, let DeepSpeed build MARSM from the config, train, print the loss."""
    args = parse_args()
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = ByteGPT(args.d_model, args.layers, heads=4, seq_len=args.seq_len)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=args.deepspeed_config)
    micro = engine.train_micro_batch_size_per_gpu()
    data = stdlib_bytes()
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = rank_batch(data, step, rank=rank, world=world, rows=micro, seq_len=args.seq_len,
                          seed=args.seed)
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            tokens = (step + 1) * micro * world * args.seq_len
            print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} "
                  f"{tokens / (time.perf_counter() - start):,.0f} tok/s", flush=True)


if __name__ == "__main__":
    # Exit code 0 after a success, 1 with the traceback after a failure. It ends with barrier,
    # destroy_process_group and os._exit: torch 2.13's gloo ranks (DeepSpeed on the CPU) otherwise
    # abort now and then at interpreter exit, after training succeeded (see marsm_dist/shutdown.py).
    run_and_exit(main)
