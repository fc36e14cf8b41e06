"""megatron-core's GPT on CPU ranks, as the Megatron tests build and read it: the test-only CUDA
shim, a small GPTModel (TP-invariant initialization), the batches, the full parameters gathered
over tensor parallelism, and the single-process reference's routing."""

from __future__ import annotations

import warnings

import torch

GLOBAL_BATCH, VOCAB, SEQ = 4, 64, 16


def setup(tp: int, fake_cuda_type: bool = False):
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from tests.helpers.megatron_cpu_shim import CpuCudaShim

    CpuCudaShim(fake_cuda_type).install()  # fake_cuda_type: Megatron's clipping asserts CUDA tensors
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    return ps


def build_gpt(tp: int, swiglu: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)  # CPU initialization is TP-invariant: same full weights
    # No linear biases: the key part of a QKV bias has an exactly zero gradient, which Adam turns
    # from rounding noise into ~1e-5 differences between two exact runs.
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False,
                            tensor_model_parallel_size=tp, hidden_dropout=0.0, attention_dropout=0.0,
                            bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
                            persist_layer_norm=False, add_bias_linear=False,
                            # SwiGLU: fc1 holds W and V; its checkpoint entry is a ShardedTensorFactory
                            gated_linear_unit=swiglu, bias_activation_fusion=False,
                            activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=SEQ)


def batch(t: int):
    gen = torch.Generator().manual_seed(500 + t)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0).expand(GLOBAL_BATCH, SEQ)
    mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool)).logical_not().view(1, 1, SEQ, SEQ)
    return tokens[:, :-1], pos, mask, tokens[:, 1:]


def full_params(model, ps) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    group, world = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        if not getattr(p, "tensor_model_parallel", False) or world == 1:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(parts, p.detach().contiguous(), group=group)
        out[name] = torch.cat(parts, dim=p.partition_dim)
    return out


def single_process_groups(model) -> list[dict]:
    """The reference's routing: hidden matrices to MARS-M; embeddings, the output layer and
    everything 1-D to AdamW (what get_megatron_marsm_optimizer decides)."""
    groups = [{"params": [], "use_marsm": True}, {"params": [], "use_marsm": False}]
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "embedding" not in name and not getattr(
            p, "is_embedding_or_output_parameter", False)
        groups[0 if matrix else 1]["params"].append(p)
    return groups


def single_process_params(steps: int, frozen: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The reference: single-process MARSM (no Megatron wrappers, no DDP) on the TP=1 model and
    the full batch, ``steps`` steps, with the parameters named in ``frozen`` frozen. Call it on
    a rank of a 1-process group (it sets up Megatron's parallel state)."""
    from marsm_dist import MARSM

    ps = setup(1)
    model = build_gpt(1)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    opt = MARSM(single_process_groups(model), lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)
    for t in range(steps):
        tokens, pos, mask, labels = batch(t)
        model(tokens, pos, mask, labels=labels).float().mean().backward()
        opt.step()
        opt.zero_grad()
    return full_params(model, ps)
