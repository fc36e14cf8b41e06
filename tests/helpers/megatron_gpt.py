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


# ---------------------------------------------------------------------------- MoE (SequentialMLP)
NUM_EXPERTS = 4


class _FakeEvent:
    def synchronize(self) -> None:
        pass


def _gloo_dispatch_collectives() -> None:
    """What Megatron's all-to-all dispatcher asks of collectives that gloo (or the tests' collective
    log) lacks, in this process only: ``all_to_all_single`` gets its split sizes as arrays or tensors
    (the log reads lists), and with expert TP ``all_gather`` and ``reduce_scatter`` get tensors of
    different sizes (NCCL takes them; gloo's gather does not, and the log wants every rank's call
    alike: they are padded to the largest here)."""
    import torch.distributed as dist

    recorded, gather, scatter = dist.all_to_all_single, dist.all_gather, dist.reduce_scatter

    def pad(t, most):
        return torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))]).contiguous()

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        rows = [t.shape[0] for t in input_list]
        if len(set(rows)) <= 1 or async_op:
            return scatter(output, input_list, op=op, group=group, async_op=async_op)
        most = max(rows)
        out = output.new_empty((most, *output.shape[1:]))
        scatter(out, [pad(t, most) for t in input_list], op=op, group=group)
        output.copy_(out[:output.shape[0]])
        return None

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] for t in tensor_list]
        if len(set(rows)) <= 1 or async_op:
            return gather(tensor_list, tensor, group=group, async_op=async_op)
        most = max(rows)
        padded = [tensor.new_empty((most, *tensor.shape[1:])) for _ in rows]
        gather(padded, pad(tensor, most), group=group)
        for out, got, n in zip(tensor_list, padded, rows, strict=True):
            out.copy_(got[:n])
        return None

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        def as_list(sizes):
            return None if sizes is None else [int(n) for n in sizes]

        return recorded(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                        async_op=async_op)

    dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather
    dist.reduce_scatter = reduce_scatter


def setup_moe(tp: int = 1, ep: int = 1, etp: int = 1, cp: int = 1, fake_cuda_type: bool = False):
    """Megatron's parallel state for a MoE run: tensor, expert, expert-tensor and context parallel."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils

    from tests.helpers import megatron_cpu_shim

    # The all-to-all dispatcher waits on an event of its device-to-host stream: give it one.
    megatron_cpu_shim._FakeStream.record_event = lambda self, *a, **k: _FakeEvent()
    megatron_cpu_shim.CpuCudaShim(fake_cuda_type).install()
    _gloo_dispatch_collectives()

    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16.1 without TransformerEngine
        moe_utils.te_general_gemm = None  # never defined there: the router's forward raises NameError
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=etp, context_parallel_size=cp)
    return ps


class SequenceParallelNorm:
    """torch's LayerNorm as a Megatron norm module that allows sequence parallelism (Megatron's own
    torch wrapper refuses it; MoE with TP needs it): the norm is per token, and its parameters are
    marked so that ``finalize_model_grads`` sums their gradients over the TP ranks."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def build_moe_gpt(tp: int = 1, ep: int = 1, etp: int = 1, experts: int | None = NUM_EXPERTS,
                  bias: bool = False, swiglu: bool = False):
    """A small GPTModel whose MLPs are SequentialMLP MoE layers (``experts`` experts, top-2,
    all-to-all dispatch), or dense (``experts=None``); ``swiglu``: gated MLPs (fc1 holds W and V,
    ``partition_stride`` 2). Initialization depends on EP (each EP rank
    draws its own local experts from the same seed): copy a reference's weights in with
    :func:`load_full_params` to compare runs."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    moe = {} if experts is None else dict(num_moe_experts=experts, moe_router_topk=2, moe_ffn_hidden_size=48,
                                          moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0,
                                          expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=64, use_cpu_initialization=True,
                            gradient_accumulation_fusion=False,
                            tensor_model_parallel_size=tp, sequence_parallel=tp > 1 and experts is not None,
                            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                            masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
                            add_bias_linear=bias, bias_activation_fusion=False, gated_linear_unit=swiglu,
                            activation_func=torch.nn.functional.silu if swiglu else torch.nn.functional.gelu,
                            **moe)
    layer = get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False)
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = SequenceParallelNorm
    spec = TransformerBlockSubmodules(layer_specs=[layer] * cfg.num_layers, layer_norm=SequenceParallelNorm)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)


def _local_expert(name: str) -> tuple[str, int] | None:
    """(name with ``{}`` for the local expert index, that index) of a SequentialMLP expert's tensor."""
    head, sep, tail = name.partition(".local_experts.")
    if not sep:
        return None
    index, _, rest = tail.partition(".")
    return f"{head}.local_experts.{{}}.{rest}", int(index)


def _local_counts(model) -> dict[str, int]:
    """How many local experts each SequentialMLP tensor has (by its name with ``{}``)."""
    counts: dict[str, int] = {}
    for name, _ in model.named_parameters():
        expert = _local_expert(name.removeprefix("module."))
        if expert is not None:
            counts[expert[0]] = max(counts.get(expert[0], 0), expert[1] + 1)
    return counts


def _join_blocks(parts: list[torch.Tensor], p) -> torch.Tensor:
    """The full tensor from every TP rank's ``parts``: with ``partition_stride`` s, rank t holds
    blocks t, W + t, ... of the W * s blocks along ``partition_dim`` (SwiGLU's fc1: W and V)."""
    stride, dim = getattr(p, "partition_stride", 1), p.partition_dim
    chunks = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([c[j] for j in range(stride) for c in chunks], dim=dim)


def _own_blocks(full: torch.Tensor, p, world: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s blocks of ``full`` (see :func:`_join_blocks`)."""
    stride, dim = getattr(p, "partition_stride", 1), p.partition_dim
    blocks = full.chunk(world * stride, dim=dim)
    return torch.cat([blocks[j * world + rank] for j in range(stride)], dim=dim)


def full_moe_params(model, ps) -> dict[str, torch.Tensor]:
    """Every parameter as the EP1/TP1 model names and holds it: TP blocks joined (expert TP for
    experts), local expert ``i`` of EP rank ``e`` named as global expert ``e * local + i``."""
    import torch.distributed as dist

    out, ep, local = {}, ps.get_expert_model_parallel_world_size(), _local_counts(model)
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        expert = _local_expert(name)
        if expert is None:
            group, world = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
        else:
            group, world = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
        t = p.detach().clone()
        if getattr(p, "tensor_model_parallel", False) and world > 1:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=group)
            t = _join_blocks(parts, p)
        if expert is None or ep == 1:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(ep)]
        dist.all_gather(parts, t, group=ps.get_expert_model_parallel_group())
        for e, part in enumerate(parts):
            out[expert[0].format(e * local[expert[0]] + expert[1])] = part
    return out


def load_full_params(model, ps, full: dict[str, torch.Tensor]) -> None:
    """Copy the EP1/TP1 model's parameters ``full`` into this rank's shards of ``model``."""
    ep_rank, counts = ps.get_expert_model_parallel_rank(), _local_counts(model)
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        expert = _local_expert(name)
        if expert is None:
            source = full[name]
            world, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        else:
            source = full[expert[0].format(ep_rank * counts[expert[0]] + expert[1])]
            world, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
        if getattr(p, "tensor_model_parallel", False) and world > 1:
            source = _own_blocks(source, p, world, rank)
        with torch.no_grad():
            p.copy_(source)
