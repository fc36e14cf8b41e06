"""MARS-M in the Hugging Face ``Trainer`` (and Accelerate underneath it).

The one line, for every route the Trainer takes (DDP, FSDP2 through Accelerate; DeepSpeed can
also take ``"type": "MARSM"`` in its JSON config, see ``integrations/hf/``)::

    from marsm_dist.adapters.hf import MARSMForTrainer, MARSMStatsCallback

    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": 2e-2}),
                      callbacks=[MARSMStatsCallback()])

``MARSMForTrainer`` routes embeddings and the output head to the AdamW branch, which the
Trainer's own param groups cannot say; ``MARSMStatsCallback`` logs what the sharded step did.
Importing this package does not import transformers.
"""

from __future__ import annotations

from typing import Any

from .trainer_optimizer import MARSMForTrainer

__all__ = ["MARSMForTrainer", "MARSMStatsCallback"]


def __getattr__(name: str) -> Any:
    if name == "MARSMStatsCallback":  # subclasses transformers' TrainerCallback: imported on use
        from .callback import MARSMStatsCallback

        return MARSMStatsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
