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


# Mixture-of-experts models (benchmarks/scale_model.py). name -> (width, q width, k/v width, routed
# experts, expert MLP width, MoE layers, shared experts per MoE layer, dense layers, dense MLP width).
# Attention is plain multi-head / grouped-query: q (q, d), k and v (kv, d), o (d, q). DeepSeek-V3's
# MLA is replaced by 56 heads of 128 (q = k = v = 7168); its 3 dense layers (SwiGLU 18432) come first
# and every MoE layer also has its shared expert (SwiGLU 2048, dense like the attention). Qwen3-30B-A3B:
# 32 query heads and 4 key/value heads of 128, no shared expert, no dense layer. Routers, norms and
# embeddings are left out (not Newton-Schulz matrices here).
MOE_MODELS = {
    "deepseek-v3-like": (7168, 7168, 7168, 256, 2048, 58, 1, 3, 18432),
    "qwen3-30b-a3b-like": (2048, 4096, 512, 128, 768, 48, 0, 0, 0),
}


def moe_shapes(name: str, layers: int | None = None) -> tuple[list[Shape], list[int | None], int]:
    """(matrix shapes, per matrix the routed expert it belongs to within its layer or None for a
    dense matrix, routed experts per layer) of MoE model ``name`` with ``layers`` MoE layers
    (default: all; the dense layers are always there). Per block, in order: q, k, v, o; then a
    dense layer's gate, up, down, or a MoE layer's shared experts' gate, up, down and every routed
    expert's gate (f, d), up (f, d), down (d, f), expert by expert (gate and up not fused)."""
    if name not in MOE_MODELS:
        raise ValueError(f"unknown MoE model {name!r} (expected one of {sorted(MOE_MODELS)})")
    d, q, kv, experts, f, depth, shared, dense, dense_ffn = MOE_MODELS[name]
    layers = depth if layers is None else layers
    shapes: list[Shape] = []
    owner: list[int | None] = []

    def add(new: list[Shape], expert: int | None = None) -> None:
        shapes.extend(new)
        owner.extend([expert] * len(new))

    for block in range(dense + layers):
        add([(q, d), (kv, d), (kv, d), (d, q)])
        if block < dense:
            add([(dense_ffn, d), (dense_ffn, d), (d, dense_ffn)])
            continue
        add([(f, d), (f, d), (d, f)] * shared)
        for e in range(experts):
            add([(f, d), (f, d), (d, f)], e)
    return shapes, owner, experts
