"""Rank 0's outputs: the comparison table, the JSON summary and the loss-curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .train import Result


def table(results: list[Result]) -> str:
    """The comparison, one row per optimizer."""
    head = (f"{'optimizer':<10} {'peak lr':>8} {'train loss':>11} {'val loss':>9} {'tokens/s':>9} "
            f"{'opt step ms':>12} {'total s':>8}")
    rows = [f"{r.optimizer:<10} {r.lr:>8.0e} {r.final_loss:>11.4f} {r.val_loss:>9.4f} "
            f"{r.tokens_per_s:>9,.0f} {r.opt_step_ms:>12.1f} {r.seconds:>8.1f}" for r in results]
    note = ("train loss: mean of the last 10 steps; val loss: held-out stdlib files; opt step: "
            "wall time of the optimizer step (all ranks' work, communication included)")
    return "\n".join([head, "-" * len(head), *rows, note])


def write_json(path: Path, meta: dict, results: list[Result]) -> None:
    """``meta`` (run settings) plus every run's curve, losses and timings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": [r.to_dict() for r in results]}, indent=1))


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(path: Path, results: list[Result], title: str) -> bool:
    """Training-loss curves (raw, faint, and smoothed) with each run's validation loss marked.

    Returns False, with a note on stderr, when matplotlib is missing (it comes with the
    ``demo`` extra, which launch/setup.sh installs).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot: matplotlib is not installed (pip install 'marsm-dist[demo]'); skipped {path}",
              file=sys.stderr)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for r in results:
        steps = range(1, len(r.losses) + 1)
        (line,) = ax.plot(steps, _smooth(r.losses, max(1, len(r.losses) // 25)),
                          label=f"{r.optimizer} (val {r.val_loss:.3f})")
        ax.plot(steps, r.losses, color=line.get_color(), alpha=0.2, linewidth=0.8)
        ax.plot([len(r.losses)], [r.val_loss], marker="o", color=line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
