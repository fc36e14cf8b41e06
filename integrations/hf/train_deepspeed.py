"""Hugging Face Trainer + DeepSpeed ZeRO, MARS-M chosen in the DeepSpeed JSON config:

    torchrun --nproc_per_node 8 integrations/hf/train_deepspeed.py --output-dir runs/ds \\
        --deepspeed integrations/hf/ds_zero2.json
    # resume: add --resume runs/ds/checkpoint-20

Two MARS-M lines: ``"optimizer": {"type": "MARSM", ...}`` in the JSON, and the import of
``marsm_dist.adapters.deepspeed`` (it teaches DeepSpeed the type) before the Trainer is built.
DeepSpeed then builds MARSM with MARS-M's routing on its ZeRO partitions, every rank owning
some matrices' Newton-Schulz; checkpoints are DeepSpeed's own.
"""

from __future__ import annotations

import json

from common import parse_args, train
from transformers import TrainingArguments

import marsm_dist.adapters.deepspeed  # noqa: F401  (makes "type": "MARSM" known to DeepSpeed)
from marsm_dist.shutdown import run_and_exit


def main() -> None:
    """Train (or resume) the tiny GPT-2 under DeepSpeed with the JSON's optimizer."""
    args = parse_args(__doc__)
    with open(args.deepspeed) as f:
        config = json.load(f)
    config["optimizer"]["params"]["ns_dtype"] = args.ns_dtype  # the flag wins over the JSON
    training = TrainingArguments(  # "auto" in the JSON: lr, weight decay, clipping come from here
        output_dir=args.output_dir, max_steps=args.steps, save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size, logging_steps=1, seed=args.seed,
        learning_rate=args.lr, weight_decay=0.1, lr_scheduler_type="constant", report_to="none",
        deepspeed=config)
    train(args, training)  # the optimizer comes from the JSON


if __name__ == "__main__":
    run_and_exit(main)  # exit 0 after a success, 1 with the traceback; no gloo abort at exit
