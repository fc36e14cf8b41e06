"""Hugging Face Trainer + MARS-M on FSDP2 (Accelerate's ``fsdp_version: 2``):

    torchrun --nproc_per_node 8 integrations/hf/train_fsdp2.py --output-dir runs/fsdp2
    torchrun --nproc_per_node 8 integrations/hf/train_fsdp2.py --output-dir runs/fsdp2 \\
        --resume runs/fsdp2/checkpoint-20

The one MARS-M line is ``optimizer_cls_and_kwargs=(MARSMForTrainer, {...})``. The Trainer builds
the optimizer on the model before Accelerate shards it; MARSM finds FSDP2's sharded parameters
at its first step: every rank then runs the elementwise work on its shard and each matrix is
gathered to one owner rank for Newton-Schulz. Checkpoints are Accelerate's sharded (DCP) ones.
"""

from __future__ import annotations

from common import LAYER_CLASS, parse_args, train
from transformers import TrainingArguments

from marsm_dist.adapters.hf import MARSMForTrainer
from marsm_dist.shutdown import run_and_exit


def main() -> None:
    """Train (or resume) the tiny GPT-2 with MARS-M, each GPT-2 block its own FSDP2 unit."""
    args = parse_args(__doc__)
    training = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, save_steps=args.save_steps,
        per_device_train_batch_size=args.batch_size, logging_steps=1, seed=args.seed,
        lr_scheduler_type="constant", report_to="none",
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": [LAYER_CLASS[args.model]],
                                        "state_dict_type": "SHARDED_STATE_DICT"})
    train(args, training,
          optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": args.lr, "ns_dtype": args.ns_dtype}))


if __name__ == "__main__":
    run_and_exit(main)  # exit 0 after a success, 1 with the traceback; no gloo abort at exit
