"""torchtitan 0.3 job configs with MARS-M as the optimizer (``--module integrations.torchtitan``).

torchtitan's ``ConfigManager`` imports ``<--module>.config_registry`` and calls the function named
by ``--config``; each function here takes a stock torchtitan config and changes one field,
``optimizer``. Run from a directory where ``integrations`` is importable (this repository's root,
or ``PYTHONPATH=/path/to/marsm-dist``); see README.md for the launch lines.
"""

from __future__ import annotations

from torchtitan.models.llama3.config_registry import llama3_8b, llama3_debugmodel
from torchtitan.trainer import Trainer

from marsm_dist.adapters.torchtitan import MARSMContainer, marsm


def llama3_debugmodel_marsm() -> Trainer.Config:
    """torchtitan's Llama-3 debug model (the smoke-test config) trained with MARS-M."""
    config = llama3_debugmodel()
    # One rate for both branches (the AdamW branch: embeddings, head, norms); tune it for your model.
    config.optimizer = MARSMContainer.Config(lr=6e-3, weight_decay=0.1)
    return config


def llama3_8b_marsm() -> Trainer.Config:
    """Llama-3 8B with MARS-M: lr, weight decay, betas and eps carried over from torchtitan's
    AdamW config (exactly what ``--override.imports marsm_dist.adapters.torchtitan.marsm`` does).
    """
    config = llama3_8b()
    config.optimizer = marsm(config.optimizer)
    return config
