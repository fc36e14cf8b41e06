"""Single-process optimizer step time: MARSM vs torch.optim.Muon (+AdamW) vs torch.optim.AdamW.

    python benchmarks/optimizer_step.py [--model gpt2-small --layers 2] [--repeats 5] [--json out.json]

Every optimizer steps the same parameters with the same fixed gradients; the table reports the
median wall time of ``--repeats`` steps after two warm-up steps, and each time as a ratio to
torch.optim.Muon measured in the same run. Muon gets torch.optim.AdamW for the non-matrix
parameters, as MARSM has its own AdamW branch, so both steps cover the whole model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from marsm_dist import MARSM


def model_shapes(name: str, layers: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(matrix shapes, AdamW shapes) of a GPT-style model."""
    if name == "gpt2-small":
        d, vocab, ctx = 768, 50257, 1024
    elif name == "demo":
        d, vocab, ctx = 128, 256, 64
    else:
        raise ValueError(f"unknown model {name!r}")
    matrices, others = [], [(vocab, d), (ctx, d), (d,), (d,)]
    for _ in range(layers):
        matrices += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
        others += [(3 * d,), (d,), (4 * d,), (d,)] + [(d,)] * 4
    return matrices, others


def build(kind: str, matrices, others):
    gen = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in matrices]
    rest = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in others]
    for p in mats + rest:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    if kind == "marsm":
        opts = [MARSM([{"params": mats, "use_marsm": True}, {"params": rest, "use_marsm": False}],
                      lr=1e-3)]
    elif kind == "marsm-fp32-ns":
        opts = [MARSM([{"params": mats, "use_marsm": True}, {"params": rest, "use_marsm": False}],
                      lr=1e-3, ns_dtype=torch.float32)]
    elif kind == "muon+adamw":
        opts = [torch.optim.Muon(mats, lr=1e-3, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), foreach=True)]
    elif kind == "adamw":
        opts = [torch.optim.AdamW(mats + rest, lr=1e-3, betas=(0.9, 0.95), foreach=True)]
    else:
        raise ValueError(kind)
    return opts


def time_steps(opts, repeats: int) -> float:
    for _ in range(2):
        for o in opts:
            o.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for o in opts:
            o.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "demo"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    matrices, others = model_shapes(args.model, args.layers)
    n_mat = sum(torch.Size(s).numel() for s in matrices)
    n_rest = sum(torch.Size(s).numel() for s in others)
    print(f"{args.model}, {args.layers} layers: {len(matrices)} matrices ({n_mat:,} elements), "
          f"{len(others)} AdamW tensors ({n_rest:,}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} steps")
    rows = {}
    for kind in ("marsm", "marsm-fp32-ns", "muon+adamw", "adamw"):
        rows[kind] = time_steps(build(kind, matrices, others), args.repeats)
    base = rows["muon+adamw"]
    print(f"{'optimizer':<15} {'step ms':>9} {'vs Muon':>8}")
    for kind, sec in rows.items():
        print(f"{kind:<15} {1e3 * sec:>9.1f} {sec / base:>7.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "step_seconds": rows}, indent=1))


if __name__ == "__main__":
    main()
