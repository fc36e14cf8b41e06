"""MARS-M in the Hugging Face ``Trainer`` (and Accelerate underneath it).

The one line, for every route the Trainer takes (DDP, FSDP2 through Accelerate; DeepSpeed can
also take ``"type": "MARSM"`` in its JSON config, see ``integrations/hf/``)::

    from marsm_dist.adapters.hf import MARSMForTrainer, MARSMStatsCallback

    trainer = Trainer(model, args, train_dataset=data,
                      optimizer_cls_and_kwargs=(MARSMForTrainer, {"lr": 2e-2}),
                      callbacks=[MARSMStatsCallback()])

``MARSMForTrainer`` routes embeddings and the output head to the AdamW branch, which the
Trainer's own param groups cannot say; ``MARSMStatsCallback`` logs what the sharded step did.
``MARSMCheckpointCallback`` makes the Trainer's checkpoints resumable under another framework
or world size (DeepSpeed ZeRO <-> FSDP2 <-> DDP; see :mod:`.neutral_checkpoint`).

Passing ``MARSM`` itself (``optimizer_cls_and_kwargs=(MARSM, {...})``) is refused with the line
above, by :func:`~.trainer_optimizer.install`, which wraps ``Trainer.create_optimizer``. It runs
when this package is imported, and again at each ``from marsm_dist.adapters.hf import ...``, if
``transformers.trainer`` is imported by then; taking ``MARSMStatsCallback`` imports it. Importing
this package does not import transformers, and ``import marsm_dist`` does not import this package.
"""

from __future__ import annotations

from typing import Any

from .trainer_optimizer import install_if_loaded

__all__ = ["MARSMCheckpointCallback", "MARSMForTrainer", "MARSMStatsCallback"]


def __getattr__(name: str) -> Any:
    # Not bound in the module: each `from marsm_dist.adapters.hf import ...` comes here, so a Trainer
    # imported after this package still gets the refusal installed.
    if name == "MARSMForTrainer":
        from .trainer_optimizer import MARSMForTrainer

        install_if_loaded()
        return MARSMForTrainer
    if name == "MARSMStatsCallback":  # subclasses transformers' TrainerCallback: imported on use
        from .callback import MARSMStatsCallback
        from .trainer_optimizer import install

        install()  # whoever takes the callback builds a Trainer
        return MARSMStatsCallback
    if name == "MARSMCheckpointCallback":  # subclasses TrainerCallback too: imported on use
        from .neutral_checkpoint import MARSMCheckpointCallback
        from .trainer_optimizer import install

        install()  # as above; its own constructor installs the resume hook it needs
        return MARSMCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install_if_loaded()
