"""Parameter shapes of the models the benchmarks use, one definition for all of them.

GPT-2 style (``gpt2-small``, ``demo``): fused QKV, a 4x MLP, biases and LayerNorms; token and
position embeddings. Llama-3 style (``llama3-8b``, ``llama3-70b``, and ``llama3-tiny`` for dry
runs): separate q, k, v (grouped-query attention), a SwiGLU MLP, RMSNorm gains; embedding and an
untied output head.
"""

from __future__ import annotations

Shape = tuple[int, ...]

# name -> (family, width, vocabulary, context or KV width, MLP width, full depth)
MODELS = {
    "gpt2-small": ("gpt", 768, 50257, 1024, 4 * 768, 12),
    "demo": ("gpt", 128, 256, 64, 4 * 128, 2),
    "llama3-8b": ("llama", 4096, 128256, 8 * 128, 14336, 32),
    "llama3-70b": ("llama", 8192, 128256, 8 * 128, 28672, 80),
    "llama3-tiny": ("llama", 128, 256, 32, 448, 1),
}


def model_shapes(name: str, layers: int | None = None) -> tuple[list[Shape], list[Shape]]:
    """(matrix shapes, AdamW-branch shapes) of model ``name`` with ``layers`` blocks (default: all)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (expected one of {sorted(MODELS)})")
    family, d, vocab, extra, ffn, depth = MODELS[name]
    layers = depth if layers is None else layers
    matrices: list[Shape] = []
    if family == "gpt":
        others: list[Shape] = [(vocab, d), (extra, d), (d,), (d,)]  # wte, wpe, final LayerNorm
        for _ in range(layers):
            matrices += [(3 * d, d), (d, d), (ffn, d), (d, ffn)]
            others += [(3 * d,), (d,), (ffn,), (d,)] + [(d,)] * 4  # biases, two LayerNorms
    else:
        others = [(vocab, d), (vocab, d), (d,)]  # embedding, output head, final RMSNorm
        for _ in range(layers):
            matrices += [(d, d), (extra, d), (extra, d), (d, d), (ffn, d), (ffn, d), (d, ffn)]
            others += [(d,), (d,)]
    return matrices, others
