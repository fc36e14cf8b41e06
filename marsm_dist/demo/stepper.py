"""The interface the demo's training loop (``train.train``) drives, whatever the framework.

``FSDP2Stepper`` (fsdp2_setup.py), ``DeepSpeedStepper`` (deepspeed_setup.py) and ``MegatronStepper``
(megatron_setup.py) each wrap one framework's model, optimizer and gradient reduction behind it, so
the loop, its learning-rate schedule and its timings are written once. A new framework joins the
demo by writing one more class of this shape and a branch in ``worker._stepper``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stepper(Protocol):
    """One model and its optimizer, trained by the demo's loop.

    The loop calls, per step: ``store_lookahead`` (MARS-M's exact mode only), ``loss``,
    ``backward``, ``step``, ``zero_grad``. It sets each step's learning rate by writing ``"lr"``
    into ``param_groups``, so those must be the dicts the optimizer really reads.
    """

    n_params: int
    """Parameters of the whole (unsharded, un-split) model, for the run's description."""

    param_groups: list[dict[str, Any]]
    """The optimizer's own param groups: the loop scales each group's peak ``"lr"`` every step."""

    data_parallel: tuple[int, int]
    """This rank's data-parallel (index, size): which share of each global batch it trains on
    (tensor-parallel ranks of one model replica share an index)."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-byte cross-entropy of this rank's share ``x`` (inputs), ``y`` (targets)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, and the framework's data-parallel gradient reduction, if it is not inside it."""
        ...

    def step(self) -> None:
        """One optimizer step on the reduced gradients."""
        ...

    def zero_grad(self) -> None:
        """Clear the gradients for the next step (a no-op where ``step`` already did)."""
        ...

    def store_lookahead(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """MARS-M's exact mode: store the gradient of the next batch at the current weights.
        Frameworks without a moment for it raise ``NotImplementedError`` (the command line
        refuses the combination before any stepper is built)."""
        ...
