"""What the three Trainer recipes share: a tiny GPT-2 (or, ``--model moe``, a tiny Qwen3-MoE), a
synthetic corpus, the command line, and the end of a run. Copy this folder; in your own job, your
model and dataset replace these."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from marsm_dist import step_stats
from marsm_dist.adapters.hf import MARSMCheckpointCallback, MARSMStatsCallback


def parse_args(description: str) -> argparse.Namespace:
    """The recipes' flags (``--local_rank`` is what the deepspeed launcher appends)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="hf_marsm_run", help="checkpoints go here")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=20)
    p.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    p.add_argument("--neutral", action="store_true",
                   help="checkpoints any framework and world size resumes from (MARSMCheckpointCallback); "
                        "with --resume, a checkpoint of another framework or world size resumes from it")
    p.add_argument("--batch-size", type=int, default=8, help="per device")
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--ns-dtype", default="bfloat16", help="Newton-Schulz dtype (float32 to compare runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepspeed", default="ds_zero2.json", help="DeepSpeed JSON (train_deepspeed.py only)")
    p.add_argument("--log-json", default=None, help="write each rank's losses and MARS-M figures here")
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--model", default="gpt2", choices=sorted(MODELS),
                   help="the tiny model: gpt2, or moe (a mixture of experts, Qwen3-MoE)")
    return p.parse_args()


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    """A 2-layer byte-level GPT-2 (tied head), no dropout, so runs compare exactly."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_moe(seed: int) -> PreTrainedModel:
    """A 2-layer Qwen3-MoE over the same bytes: 4 experts per layer (2 per token), no dropout, no
    auxiliary loss. Its stacked expert tensors ``mlp.experts.gate_up_proj`` ``(4, 48, 32)`` and
    ``down_proj`` ``(4, 32, 24)`` take MARS-M one expert at a time (``param_groups``'s
    ``experts=True`` group); under FSDP2 on 2 ranks each rank holds 2 whole experts of each."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=256, max_position_embeddings=32, hidden_size=32, intermediate_size=24,
                            moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            decoder_sparse_step=1, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
    return Qwen3MoeForCausalLM(config)


# ``--model``: the factory and the decoder layer FSDP2 wraps as a unit.
MODELS: dict[str, Callable[[int], PreTrainedModel]] = {"gpt2": tiny_gpt2, "moe": tiny_moe}
LAYER_CLASS: dict[str, str] = {"gpt2": "GPT2Block", "moe": "Qwen3MoeDecoderLayer"}


class CountingSequences(Dataset):
    """Sequences x[t+1] = (a x[t] + b) mod 256 with a, b drawn per sample: learnable, no download."""

    def __init__(self, n: int = 4096, seq_len: int = 32, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(1, 8, (n, 1), generator=g)
        b = torch.randint(0, 256, (n, 1), generator=g)
        x = torch.randint(0, 256, (n, 1), generator=g)
        steps = [x]
        for _ in range(seq_len - 1):
            steps.append((a * steps[-1] + b) % 256)
        self.tokens = torch.cat(steps, dim=1)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


class LossLog(TrainerCallback):
    """Keep each step's loss and MARS-M figures; :func:`finish` writes them per rank."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: D102
        if logs and "loss" in logs:
            self.rows.append({"step": state.global_step, "loss": logs["loss"]})


def train(args: argparse.Namespace, training: TrainingArguments, **trainer_kwargs) -> None:
    """Train (or resume, ``--resume``) the tiny model (``--model``, GPT-2 unless given) with the
    Trainer; ``trainer_kwargs`` carry the recipe's MARS-M line. MARSMStatsCallback prints each
    logging step's sharding figures; ``--neutral`` adds MARSMCheckpointCallback, whose checkpoints
    move between the recipes (DeepSpeed ZeRO, FSDP2, DDP) and world sizes."""
    losses = LossLog()
    model = MODELS[getattr(args, "model", "gpt2")](args.seed)
    callbacks = [MARSMStatsCallback(), losses]
    if getattr(args, "neutral", False):
        callbacks.append(MARSMCheckpointCallback())
    trainer = Trainer(model=model, args=training, train_dataset=CountingSequences(),
                      callbacks=callbacks, **trainer_kwargs)
    trainer.train(resume_from_checkpoint=args.resume)
    finish(args, losses, lambda: asdict(step_stats(trainer.optimizer)))


def finish(args: argparse.Namespace, losses: LossLog, stats: Callable[[], dict] | None = None) -> None:
    """Write ``--log-json`` (one file per rank). The process group is left by the recipe's
    ``run_and_exit(main)``: barrier, destroy and ``os._exit`` (see marsm_dist/shutdown.py)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.log_json:
        path = args.log_json if rank == 0 else f"{args.log_json}.rank{rank}"
        with open(path, "w") as f:
            json.dump({"rank": rank, "losses": losses.rows, "marsm": stats() if stats else None}, f)
