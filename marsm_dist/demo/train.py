"""Train TinyGPT with one optimizer and report losses and timings."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import MARSM, param_groups
from .data import Batches
from .model import TinyGPT

# Peak learning rates. Not tuned to make MARS-M win: MARS-M and Muon use the same lr because
# both scale their orthogonal update to an RMS of 0.2 (Moonlight's rule), and AdamW takes 3e-3,
# a usual peak for models of this size.
DEFAULT_LR = {"marsm": 1e-2, "muon": 1e-2, "adamw": 3e-3}


@dataclass
class Config:
    """Everything one training run depends on."""

    optimizer: str = "marsm"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    lr: float | None = None
    weight_decay: float = 0.1
    warmup: int = 30
    mode: str = "approx"
    ns_dtype: str = "bfloat16"
    seed: int = 0
    log_every: int = 25
    eval_batches: int = 8


@dataclass
class Result:
    """What a run produced: the loss curve, the final validation loss and the timings."""

    config: Config
    losses: list[float] = field(default_factory=list)
    val_loss: float = float("nan")
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    opt_step_ms: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Chain:
    """Several optimizers stepped together (Muon for matrices + AdamW for the rest)."""

    def __init__(self, *opts: torch.optim.Optimizer) -> None:
        self.opts = opts
        self.param_groups = [g for o in opts for g in o.param_groups]

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def zero_grad(self) -> None:
        for o in self.opts:
            o.zero_grad()


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """The optimizer named by ``cfg.optimizer``, with the shared lr and weight decay."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    if cfg.optimizer == "marsm":
        return MARSM(param_groups(model), lr=lr, weight_decay=cfg.weight_decay,
                     ns_dtype=cfg.ns_dtype, approx=cfg.mode == "approx")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        matrix, other = param_groups(model, named=False)
        return _Chain(
            torch.optim.Muon(matrix["params"], lr=lr, weight_decay=cfg.weight_decay,
                             adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(other["params"], lr=lr, betas=(0.9, 0.95),
                              weight_decay=cfg.weight_decay),
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (expected marsm, muon or adamw)")


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: Config, batches: Batches, log=print) -> Result:
    """Train from the same initial weights and batches as every other run with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.d_model, cfg.layers, cfg.heads, cfg.seq_len)
    opt = build_optimizer(cfg, model)
    peaks = [g["lr"] for g in opt.param_groups]
    exact = cfg.optimizer == "marsm" and cfg.mode == "exact"
    result, opt_seconds, start = Result(cfg), 0.0, time.perf_counter()
    for step in range(cfg.steps):
        for g, peak in zip(opt.param_groups, peaks, strict=True):
            g["lr"] = peak * lr_factor(step, cfg)
        if exact:  # look-ahead: the next batch's gradient at the current weights
            model(*batches.batch(step + 1)).backward()
            opt.store_lookahead_grad()
            opt.zero_grad()
        loss = model(*batches.batch(step))
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        opt_seconds += time.perf_counter() - t0
        opt.zero_grad()
        result.losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - start
            tokens = (step + 1) * cfg.batch_size * cfg.seq_len * (2 if exact else 1)
            log(f"  [{cfg.optimizer:>5}] step {step + 1:>5}/{cfg.steps}  loss {loss.item():.4f}  "
                f"{tokens / elapsed:,.0f} tok/s  opt step {1e3 * opt_seconds / (step + 1):.1f} ms")
    result.seconds = time.perf_counter() - start
    result.tokens_per_s = cfg.steps * cfg.batch_size * cfg.seq_len / result.seconds
    result.opt_step_ms = 1e3 * opt_seconds / cfg.steps
    with torch.no_grad():
        vals = [model(x, y).item() for x, y in batches.val_batches(cfg.eval_batches)]
    result.val_loss = sum(vals) / len(vals)
    if not all(math.isfinite(v) for v in result.losses):
        raise FloatingPointError(f"{cfg.optimizer}: the training loss became NaN/Inf")
    return result
