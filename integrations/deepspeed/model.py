"""The recipe's model and data, in plain PyTorch (no DeepSpeed): replace them with yours.

``ByteGPT`` is a small byte-level GPT: its ``nn.Linear`` weights inside the blocks are the hidden
matrices MARS-M orthogonalizes; the embeddings, the output head, the norms and the biases take its
AdamW branch. ``forward(x, y)`` returns the loss, which is what a DeepSpeed engine is called for.
``stdlib_bytes`` and ``rank_batch`` feed it bytes of the Python standard library's own source, so
nothing is downloaded.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each added to the stream."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        # No bias on the fused QKV: softmax ignores a shift shared by all keys, so the key bias
        # would get an exactly zero gradient and AdamW would only follow rounding noise there.
        self.attn_in = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 3 * width, bias=False))
        self.attn_out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, h: Tensor) -> Tensor:
        b, t, w = h.shape
        q, k, v = self.attn_in(h).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        h = h + self.attn_out(mixed)
        return h + self.mlp(h)


class ByteGPT(nn.Module):
    """A GPT over bytes (vocabulary 256) with ``layers`` blocks of ``width`` channels."""

    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, seq_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(seq_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 256, bias=False))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The mean next-byte cross-entropy of inputs ``x`` against targets ``y``, both (batch, time)."""
        h = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device))
        logits = self.head(self.blocks(h))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def stdlib_bytes(limit: int = 2_000_000) -> Tensor:
    """The standard library's top-level ``.py`` files as one stream of at most ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(path.read_bytes() for path in sorted(root.glob("*.py")))[:limit]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def rank_batch(data: Tensor, step: int, *, rank: int, world: int, rows: int, seq_len: int,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """This rank's ``rows`` windows of global batch ``step`` (``rows * world`` random windows of
    ``data``): inputs and next-byte targets. Every rank draws the same global batch from
    ``(seed, step)`` and keeps its own block of rows, so the ranks never train on the same rows."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(len(data) - seq_len - 1, (rows * world, 1), generator=gen)
    windows = data[starts[rank * rows:(rank + 1) * rows] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]
