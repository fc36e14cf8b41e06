"""Megatron-core: tensor-parallel layouts and a MARS-M optimizer builder.

``get_megatron_marsm_optimizer(config, model_chunks, ...)`` takes the place of Megatron's
``get_megatron_optimizer``: it returns a ``ChainedOptimizer`` that Megatron's training loop
steps, zeroes, checkpoints and schedules as usual. Inside, one ``MARSM`` takes every
parameter: hidden matrices take the MARS-M update, embeddings, the output layer, norms and
biases the AdamW branch (Megatron's ``is_embedding_or_output_parameter`` marker decides, as
well as the names).

A tensor-parallel weight (``tensor_model_parallel=True``; at TP=1 Megatron still marks its
parallel linear layers and embeddings so) is one block of the full logical matrix along
``partition_dim`` (``partition_stride`` > 1, as in SwiGLU's fc1, interleaves blocks). Without the
distributed optimizer it is described over the whole job group: tensor-and-data-parallel (TP x DP),
with context parallelism (TP x DP x CP) when CP > 1. Every data-parallel (DP) and context-parallel
(CP) rank is a copy of its own holding its TP rank's block. Each matrix is then orthogonalized once
in that group: gathered from one copy's TP ranks to its owner, which runs Newton-Schulz on the full
matrix, scattered back to that copy and broadcast over the DP (x CP) group to the other copies
(which end bitwise identical). Matrices Megatron does not mark (replicated over TP, DP and CP) are
divided over the same group through ``MARSM(process_group=...)``. A fused QKV weight is one matrix
(docs/algorithm.md sections 2 and 10); ``split_qkv=True`` orthogonalizes the Q, K and V rows of
every query group as separate matrices instead (each TP rank holds whole query groups, so no
exchange is needed, and the result is the same with and without TP; every rank runs those itself).

MoE (SequentialMLP: each local expert's weights are separate tensors, Megatron's
``allreduce=False``): Megatron's expert-parallel param groups become ``experts=True`` groups, and
local expert ``i`` of every expert-parallel (EP) rank is described over the same job group as one
``(EP, *expert)`` tensor (dim 0: the EP rank, so global expert ``ep * local experts + i``), expert
tensor parallel (ETP) blocks inside each expert, a copy per expert-data-parallel (EDP) rank (which
folds CP in). MARSM splits it into one matrix per global expert, orthogonalized once in the job by
a rank that holds it (with ETP 1 it holds it whole: no gather) and broadcast over the EDP group.
Expert biases, ``(EP, n)``, take AdamW; the router too (see :mod:`marsm_dist.param_groups`).

With ``use_distributed_optimizer=True`` MARS-M shards its own state over the data-parallel ranks
(:mod:`marsm_dist.adapters.megatron.sharded`), in place of Megatron's Adam-only one: each rank
steps its flat ranges of the DDP buffers' shards (dense buffers over DP x CP, expert buffers over
EDP), and each matrix's (each global expert's) pieces are gathered to one owner among the ranks
that hold them. Its dist-checkpoints and the replicated optimizer's hold the same global tensors,
so a run saved at one (TP, EP, ETP, CP, DP) split loads at another, into either optimizer.

The modules, from the bottom up (each imports only those above it in this list):
``tp_layout`` (a TP shard's pieces of its full matrix, for both optimizers), ``tp_adapter`` (the
replicated optimizer's sharding adapter), ``routing`` (which parameters MARS-M takes; Megatron's
groups split and matched), ``checkpoint`` (the distributed optimizer's dist-checkpointing),
``sharded`` (the distributed optimizer), ``builder`` (chooses between them) and ``args`` (flags).
"""

from __future__ import annotations

try:
    import megatron.core  # noqa: F401
    from megatron.core.optimizer import _get_param_groups  # noqa: F401  (private: moved between versions)
    from megatron.core.optimizer.optimizer import param_group_identifier_keys  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError('marsm_dist.adapters.megatron needs megatron-core: pip install "marsm-dist[megatron]"'
                      ) from err

from .args import add_marsm_args, marsm_kwargs_from_args
from .builder import get_megatron_marsm_optimizer
from .checkpoint import flat_range_boxes, flat_range_pieces, load_flat_state, sharded_flat_state
from .routing import marsm_routes, match_param_groups
from .sharded import MegatronDPShardAdapter, ShardedMARSMOptimizer, dp_shard_ranges
from .tp_adapter import MegatronTPAdapter
from .tp_layout import tensor_and_data_parallel_group, tp_block_count

__all__ = [
    "MegatronDPShardAdapter",
    "MegatronTPAdapter",
    "ShardedMARSMOptimizer",
    "add_marsm_args",
    "dp_shard_ranges",
    "flat_range_boxes",
    "flat_range_pieces",
    "get_megatron_marsm_optimizer",
    "load_flat_state",
    "marsm_kwargs_from_args",
    "marsm_routes",
    "match_param_groups",
    "sharded_flat_state",
    "tensor_and_data_parallel_group",
    "tp_block_count",
]
