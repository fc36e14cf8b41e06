"""Hugging Face Trainer + MARS-M, plain data parallel (DDP):

    torchrun --nproc_per_node 2 integrations/hf/train_ddp.py --output-dir runs/ddp
    torchrun --nproc_per_node 2 integrations/hf/train_ddp.py --output-dir runs/ddp \\
        --resume runs/ddp/checkpoint-20

The one MARS-M line is ``optimizer_cls_and_kwargs=(MARSMForTrainer, {...})``: it routes the
embeddings and the tied head to AdamW and, as the parameters are replicated, gives each matrix
one owner rank for Newton-Schulz (the others receive the result).
"""

from __future__ import annotations

import torch
from common import parse_args, train
from transformers import TrainingArguments

from marsm_dist.adapters.hf import MARSMForTrainer
from marsm_dist.shutdown import run_and_exit


def main() -> None:
    """Train (or resume) the tiny GPT-2 with MARS-M under the Trainer's DDP."""
    args = parse_args(__doc__)
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size, logging_steps=1, seed=args.seed,
        lr_scheduler_type="constant", report_to="none", use_cpu=not torch.cuda.is_available())
    train(args, training,
          optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": args.lr, "ns_dtype": args.ns_dtype}))


if __name__ == "__main__":
    run_and_exit(main)  # exit 0 after a success, 1 with the traceback; no gloo abort at exit
