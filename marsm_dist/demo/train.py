"""One training run of TinyGPT with one optimizer, on every rank: the loop, its schedule and timings."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .data import Batches
from .dist_env import DistEnv
from .stepper import Stepper

OPTIMIZERS = ("marsm", "muon", "adamw")

# Peak learning rates: each optimizer's best of a sweep, benchmarks/quality.py (200 steps of the
# default model and batch, 2 seeds, rates a factor of 2 apart, the best inside the grid; lowest mean
# validation loss; results in benchmarks/results/quality.json). MARS-M and Muon land on the same
# rate, as expected: both scale their orthogonal update to an RMS of 0.2 (Moonlight's rule;
# torch.optim.Muon's adjust_lr_fn="match_rms_adamw"). The AdamW branches of MARS-M and Muon share
# their lr.
DEFAULT_LR = {"marsm": 2e-2, "muon": 2e-2, "adamw": 1e-3}


@dataclass
class Config:
    """Everything one training run depends on (``batch_size`` is global, split across ranks)."""

    optimizer: str = "marsm"
    framework: str = "fsdp2"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    lr: float | None = None
    weight_decay: float = 0.1
    mode: str = "approx"
    gamma: float | None = None  # MARS-M's variance-reduction strength; None: MARSM's default
    ns_dtype: str = "auto"
    zero_stage: int = 2
    tensor_parallel: int = 1
    distributed_optimizer: bool = False
    seed: int = 0
    log_every: int = 25
    eval_batches: int = 8

    @property
    def peak_lr(self) -> float:
        """``lr`` if given, else the optimizer's documented default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def marsm_kwargs(self) -> dict:
        """MARS-M settings beyond the shared ones that were set (left out: MARSM's defaults)."""
        return {} if self.gamma is None else {"gamma": self.gamma}

    @property
    def warmup(self) -> int:
        """Linear warm-up over the first 10% of the steps."""
        return max(1, self.steps // 10)

    @property
    def exact(self) -> bool:
        """Whether this run computes MARS-M's look-ahead gradient (two backward passes a step)."""
        return self.optimizer == "marsm" and self.mode == "exact"


@dataclass
class Result:
    """What a run produced: the loss curve (mean over ranks), the validation loss, the timings."""

    optimizer: str
    lr: float
    losses: list[float] = field(default_factory=list)
    val_loss: float = float("nan")
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    opt_step_ms: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 steps (one batch is noisy)."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict:
        """JSON-ready, with the final training loss spelled out."""
        return {**asdict(self), "final_train_loss": self.final_loss}


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: Config, batches: Batches, env: DistEnv, stepper: Stepper,
          on_step: Callable | None = None) -> Result:
    """``cfg.steps`` steps of ``stepper`` (fsdp2_setup, deepspeed_setup, megatron_setup) on its
    ``data_parallel = (rank, size)`` share of each global batch. ``on_step(step, result,
    opt_seconds)`` is called after every step (rank 0's bar)."""
    peaks = [g["lr"] for g in stepper.param_groups]
    result = Result(cfg.optimizer, cfg.peak_lr)
    opt_seconds, start = 0.0, time.perf_counter()
    for step in range(cfg.steps):
        for g, peak in zip(stepper.param_groups, peaks, strict=True):
            g["lr"] = peak * lr_factor(step, cfg)
        if cfg.exact:  # look-ahead: the next batch's gradient at the current weights
            stepper.store_lookahead(*env.slice(batches.batch(step + 1), *stepper.data_parallel))
        loss = stepper.loss(*env.slice(batches.batch(step), *stepper.data_parallel))
        stepper.backward(loss)
        env.synchronize()
        t0 = time.perf_counter()
        stepper.step()
        env.synchronize()
        opt_seconds += time.perf_counter() - t0
        stepper.zero_grad()
        # Every framework averages gradients over data-parallel ranks, so the global loss is the
        # ranks' mean (tensor-parallel ranks of one data-parallel rank hold the same loss).
        result.losses.append(env.mean(loss.detach()))
        if not math.isfinite(result.losses[-1]):
            raise FloatingPointError(f"{cfg.optimizer}: the training loss became {result.losses[-1]} "
                                     f"at step {step + 1}")
        if on_step is not None:
            on_step(step + 1, result, opt_seconds)
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / result.seconds
    result.opt_step_ms = 1e3 * opt_seconds / cfg.steps
    with torch.no_grad():
        vals = [env.mean(stepper.loss(*env.slice(b, *stepper.data_parallel)).detach())
                for b in batches.val_batches(cfg.eval_batches)]
    result.val_loss = sum(vals) / len(vals)
    return result
