"""The recipe's data: the Python standard library's own source as bytes (vocabulary 256), so
nothing is downloaded. Replace it with your Megatron dataset.

Like Megatron's own loaders, ``Windows`` walks the corpus in one fixed shuffled order, and global
batch ``i`` is a function of ``i`` alone: a run resumed from a checkpoint, at any tensor- or
data-parallel size, sees the batches the uninterrupted run would have.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import Tensor


def stdlib_bytes(limit: int = 4_000_000) -> Tensor:
    """The standard library's top-level ``.py`` files, in name order, as at most ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(path.read_bytes() for path in sorted(root.glob("*.py")))[:limit]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class Windows:
    """The corpus cut into non-overlapping windows of ``seq_len + 1`` bytes, in an order fixed by ``seed``."""

    def __init__(self, data: Tensor, seq_len: int, seed: int) -> None:
        self.data, self.seq_len = data, seq_len
        count = (len(data) - 1) // seq_len
        self.order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))

    def batch(self, iteration: int, global_batch: int, dp_rank: int, dp_size: int) -> tuple[Tensor, Tensor]:
        """Data-parallel rank ``dp_rank``'s ``global_batch // dp_size`` rows of global batch
        ``iteration`` (the ranks of one tensor-parallel group get the same rows): inputs and
        next-byte targets. Only this rank's rows are cut out."""
        rows = global_batch // dp_size
        first = iteration * global_batch + dp_rank * rows
        picked = self.order[(first + torch.arange(rows)) % len(self.order)]
        windows = self.data[(picked * self.seq_len).unsqueeze(1) + torch.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]


def causal_mask(seq_len: int, device: torch.device) -> Tensor:
    """Megatron's attention-mask convention: True where a position may NOT attend (the future)."""
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)
    return future.view(1, 1, seq_len, seq_len)
