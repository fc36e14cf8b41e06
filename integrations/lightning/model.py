"""The recipe's model and data, in plain PyTorch (no Lightning): swap in your own.

``TinyGPT`` is a small GPT: token and position embeddings, pre-norm blocks of causal attention
and an MLP (``nn.Linear`` layers: the hidden matrices MARS-M takes), a final LayerNorm and a
separate ``lm_head``. ``token_batch`` makes global batch ``step`` from ``(seed, step)`` alone, so
any number of ranks, and a resumed run, can produce exactly the same batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        # No qkv bias: the key bias's gradient is exactly zero (softmax ignores a shift of all
        # scores), so AdamW's normalized step would follow rounding noise there.
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT language model; ``forward(x, y)`` returns the mean next-token cross-entropy."""

    def __init__(self, vocab: int = 64, d_model: int = 32, layers: int = 2, heads: int = 2,
                 seq_len: int = 16) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        logits = self.lm_head(self.ln_f(h))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def token_batch(seed: int, step: int, batch_size: int, seq_len: int, vocab: int) -> tuple[Tensor, Tensor]:
    """Global batch ``step``: arithmetic sequences mod ``vocab`` (random start and stride per row),
    a pattern the model can learn. Returns inputs and next-token targets, both ``(batch, seq_len)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(vocab, (batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)
    seq = (start + stride * torch.arange(seq_len + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]
