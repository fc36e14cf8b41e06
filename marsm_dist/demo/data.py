"""A byte-level corpus built from the standard library's own ``.py`` files (no download)."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch


def stdlib_corpus(max_bytes: int = 4_000_000, val_every: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation bytes from stdlib source files (every ``val_every``-th file is
    held out), as int64 tensors of at most ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if "test" not in p.parts and "site-packages" not in p.parts]
    # A fixed shuffle, so neither split is dominated by one package (encodings/ is all tables).
    random.Random(0).shuffle(files)
    train, val, total = [], [], 0
    for i, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        (val if i % val_every == 0 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not train or not val:
        raise RuntimeError(f"too few .py files found under {root}")
    return tuple(torch.frombuffer(bytearray(b"".join(part)), dtype=torch.uint8).long()
                 for part in (train, val))


def share(batch: tuple[torch.Tensor, torch.Tensor], part: int, parts: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Share ``part`` of ``parts`` equal, consecutive row blocks of a global batch (one
    data-parallel rank's)."""
    x, y = batch
    n = x.shape[0] // parts
    rows = slice(part * n, (part + 1) * n)
    return x[rows], y[rows]


class Batches:
    """Deterministic batches: ``batch(t)`` is the same for every optimizer and every call."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, batch_size: int, seq_len: int,
                 seed: int) -> None:
        self.train, self.val = train, val
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def _sample(self, data: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - self.seq_len - 1, (self.batch_size,), generator=gen)
        rows = torch.stack([data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(self.train, self.seed * 1_000_003 + t)

    def val_batches(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._sample(self.val, -1 - i) for i in range(count)]
