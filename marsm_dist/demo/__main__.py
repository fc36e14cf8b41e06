"""``python -m marsm_dist.demo``: train a tiny byte-level GPT with MARS-M (and baselines)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from .data import Batches, stdlib_corpus
from .train import Config, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line (every flag has a default)."""
    d = Config()
    p = argparse.ArgumentParser(prog="python -m marsm_dist.demo", description=__doc__)
    p.add_argument("--optimizers", default="marsm,adamw",
                   help="comma-separated list from marsm, muon, adamw (default: marsm,adamw)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--lr", type=float, default=None, help="peak lr for every optimizer "
                   "(default: 1e-2 for marsm and muon, 3e-3 for adamw)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--mode", choices=["approx", "exact"], default=d.mode, help="MARS-M correction")
    p.add_argument("--ns-dtype", choices=["bfloat16", "float32"], default=d.ns_dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--json", type=Path, default=None, help="write a JSON summary here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list:
    """Train one model per optimizer on the same data, print a comparison, optionally save JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Config(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                  d_model=args.d_model, layers=args.layers, heads=args.heads, lr=args.lr,
                  weight_decay=args.weight_decay, mode=args.mode, ns_dtype=args.ns_dtype,
                  seed=args.seed, log_every=args.log_every)
    batches = Batches(*stdlib_corpus(), base.batch_size, base.seq_len, base.seed)
    print(f"corpus: {len(batches.train):,} training and {len(batches.val):,} validation bytes of "
          "Python standard library source; "
          f"model d={base.d_model} layers={base.layers}; {base.steps} steps of "
          f"{base.batch_size}x{base.seq_len} tokens; torch threads {torch.get_num_threads()}")
    results = []
    for name in [s.strip() for s in args.optimizers.split(",") if s.strip()]:
        print(f"training with {name} ...")
        results.append(train(replace(base, optimizer=name), batches))
    print(f"\n{'optimizer':<10} {'final train loss':>17} {'val loss':>9} {'tok/s':>9} "
          f"{'opt step ms':>12} {'seconds':>8}")
    for r in results:
        tail = r.losses[-10:]
        print(f"{r.config.optimizer:<10} {sum(tail) / len(tail):>17.4f} {r.val_loss:>9.4f} "
              f"{r.tokens_per_s:>9,.0f} {r.opt_step_ms:>12.1f} {r.seconds:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
