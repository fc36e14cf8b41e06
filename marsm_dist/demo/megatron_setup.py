"""The demo on megatron-core: Megatron's GPTModel in Megatron's DistributedDataParallel, with the
optimizers built the way a Megatron training script builds them.

- MARS-M: ``get_megatron_marsm_optimizer`` (the adapter's drop-in for ``get_megatron_optimizer``).
- AdamW: Megatron's own ``get_megatron_optimizer`` with ``optimizer="adam"`` (decoupled weight
  decay; torch's AdamW when neither Transformer Engine nor Apex is installed).
- Muon: ``torch.optim.Muon`` on exactly the matrices MARS-M orthogonalizes plus ``torch.optim.AdamW``
  on the rest, each in Megatron's ``FP32Optimizer`` wrapper. Megatron's own Muon needs the
  ``emerging-optimizers`` package (Python >= 3.12), and torch.optim.Muon would orthogonalize each
  tensor-parallel block on its own, so the command line allows Muon only at tensor-parallel size 1.

``--distributed-optimizer`` shards the optimizer state over the data-parallel ranks: MARS-M's own
sharding (``marsm_dist.adapters.megatron.sharded``) and Megatron's ``DistributedOptimizer`` for AdamW.
Weight decay follows Megatron's rule for every optimizer: none on biases and 1-D parameters.
megatron-core's GPT forward and DDP buffers assume CUDA, so this needs GPUs.
"""

from __future__ import annotations

import warnings

import torch

from .dist_env import DistEnv
from .train import Config


def gpt_model(hidden_size: int, num_layers: int, num_attention_heads: int, seq_length: int, *,
              tensor_parallel: int = 1):
    """A byte-level (vocabulary 256) fp32 megatron-core ``GPTModel`` with the local (no Transformer
    Engine) layer spec, RoPE, and no dropout. Weights are initialized on the CPU from torch's seed,
    so they are the same for every tensor-parallel size."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
        tensor_model_parallel_size=tensor_parallel, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=256,
                    max_sequence_length=seq_length, position_embedding_type="rope")


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Megatron's attention mask for causal attention: True where a position may not attend."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril().logical_not().view(
        1, 1, seq_len, seq_len)


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Megatron's standard weight-decay skip: biases and 1-D parameters."""
    return p.ndim == 1 or name.endswith(".bias")


def _muon(config, ddp, cfg: Config):
    """torch.optim.Muon on MARS-M's matrices + torch.optim.AdamW on the rest, in Megatron wrappers."""
    from megatron.core.optimizer import ChainedOptimizer, FP32Optimizer

    from ..adapters.megatron import marsm_routes

    routes = marsm_routes([ddp])
    named = list(ddp.named_parameters())
    matrices = [p for _, p in named if routes[id(p)]]
    decay = [p for n, p in named if not routes[id(p)] and not _no_decay(n, p)]
    no_decay = [p for n, p in named if not routes[id(p)] and _no_decay(n, p)]
    wd = cfg.weight_decay
    muon = torch.optim.Muon(matrices, lr=cfg.peak_lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw")
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(config.adam_beta1, config.adam_beta2),
                              eps=config.adam_eps)
    # init_state_fn is only used when loading a checkpoint, which the demo does not do.
    return ChainedOptimizer([FP32Optimizer(o, config, lambda *a: None) for o in (muon, adamw)])


class MegatronStepper:
    """Forward, backward (Megatron DDP's gradient all-reduce) and step of a megatron-core GPT; a
    :class:`~.stepper.Stepper`.

    The first stepper in a process sets up Megatron's parallel state (tensor-parallel groups of
    ``cfg.tensor_parallel`` ranks, data-parallel over the rest); later ones reuse it.
    """

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        try:
            # megatron-core warns that Transformer Engine and Apex are missing and that a config
            # default is deprecated, once per model: expected here, and noise in the demo's output.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"megatron\.")
                self._build(cfg, env)
        except (AssertionError, RuntimeError) as err:
            if env.device.type == "cpu" and "CUDA" in str(err):
                raise RuntimeError(
                    "--framework megatron needs CUDA GPUs: megatron-core's GPT forward and its DDP "
                    "gradient buffers call torch.cuda. On this CPU machine use --framework fsdp2 or "
                    f"deepspeed. (megatron-core said: {err})") from err
            raise

    def _build(self, cfg: Config, env: DistEnv) -> None:
        # Megatron 0.16 calls collectives that torch 2.13 deprecates, once per step: not ours to fix.
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                                category=FutureWarning)
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from ..adapters.megatron import get_megatron_marsm_optimizer

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.tensor_parallel)
        self._finalize = finalize_model_grads
        # The ranks of one tensor-parallel group take the same share of each batch.
        self.data_parallel = (parallel_state.get_data_parallel_rank(),
                              parallel_state.get_data_parallel_world_size())
        torch.manual_seed(cfg.seed)
        model_parallel_cuda_manual_seed(cfg.seed)
        model = gpt_model(cfg.d_model, cfg.layers, cfg.heads, cfg.seq_len,
                          tensor_parallel=cfg.tensor_parallel).to(env.device)
        sharded = cfg.distributed_optimizer
        self.ddp = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=sharded))
        # No clipping, as in the FSDP2 and DeepSpeed runs; the demo's loop sets the lr each step.
        config = OptimizerConfig(optimizer="adam", lr=cfg.peak_lr, min_lr=0.1 * cfg.peak_lr,
                                 weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
                                 clip_grad=0.0, use_distributed_optimizer=sharded)
        if cfg.optimizer == "marsm":
            self.opt = get_megatron_marsm_optimizer(config, [self.ddp], ns_dtype=cfg.ns_dtype,
                                                    **cfg.marsm_kwargs)
        elif cfg.optimizer == "adamw":
            self.opt = get_megatron_optimizer(config, [self.ddp])
        else:
            self.opt = _muon(config, self.ddp, cfg)
        self.param_groups = self.opt.param_groups
        for g in self.param_groups:  # Megatron's scheduler would do this: no decay where wd_mult is 0
            if "wd_mult" in g:
                g["weight_decay"] = cfg.weight_decay * g["wd_mult"]
        tp_split = [getattr(p, "tensor_model_parallel", False) for p in model.parameters()]
        self.n_params = sum(p.numel() * (cfg.tensor_parallel if split else 1)
                            for p, split in zip(model.parameters(), tp_split, strict=True))
        self._mask = causal_mask(cfg.seq_len, env.device)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-byte cross-entropy of this rank's slice (Megatron's GPT returns it per token)."""
        positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        return self.ddp(x, positions, self._mask, labels=y).float().mean()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward into DDP's gradient buffers, then Megatron's data-parallel all-reduce."""
        loss.backward()
        self._finalize([self.ddp])

    def step(self) -> None:
        """Megatron's ``optimizer.step()`` (it copies the buffers' gradients in first)."""
        ok, _, _ = self.opt.step()
        if not ok:  # only a loss scaler skips steps, and the demo trains in fp32
            raise FloatingPointError("megatron-core skipped the optimizer step")

    def zero_grad(self) -> None:
        """Clear DDP's gradient buffers and the optimizer's gradients."""
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()

    def store_lookahead(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Not available under Megatron (refused up front by the command line)."""
        raise NotImplementedError("MARS-M's exact mode is not available with --framework megatron")
