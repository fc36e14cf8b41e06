"""Models and data for the FSDP2 tests, and the single-process reference run.

The GPT here is the tests' own (the benchmarks borrow it too): the demo is a leaf that nothing
outside its own package imports, and test_planted_errors.py runs these tests on a copy of the
package and ``tests`` alone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from marsm_dist import MARSM, param_groups

GLOBAL_BATCH = 12  # divisible by every world size the tests use (1, 2, 3, 4)


class Awkward(nn.Module):
    """Rows that do not divide by the world size, and a matrix with fewer rows than ranks.

    (30, 16) splits 8,8,8,6 over 4 ranks and 10,10,10 over 3; (7, 30) splits 2,2,2,1 and 3,3,1;
    (3, 7) splits 1,1,1,0 over 4 ranks: rank 3 holds an empty shard.
    """

    def __init__(self, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.loss_scale = loss_scale  # > 1: gradients large enough that the c_t clip engages
        self.emb = nn.Embedding(11, 16)
        self.a = nn.Linear(16, 30)
        self.norm = nn.LayerNorm(30)
        self.b = nn.Linear(30, 7)
        self.c = nn.Linear(7, 3, bias=False)
        self.head = nn.Linear(3, 11)

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.norm(self.a(self.emb(idx))))
        logits = self.head(torch.tanh(self.c(torch.tanh(self.b(x)))))
        return self.loss_scale * nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


class GPTBlock(nn.Module):
    """Pre-norm block: causal attention through a fused QKV matrix, then a GELU MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])
        # No QKV bias: the key part of one has an exactly zero gradient (softmax ignores a shift
        # shared by all keys), so its gradient is pure rounding noise, which Adam normalizes into
        # O(lr) steps: two exact runs that sum gradients in another order then drift apart there
        # by ~1e-5 in 10 steps. Without it the comparisons stay about the optimizer.
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norms[0](x)).unflatten(-1, (3, self.heads, -1))  # (b, t, 3, heads, d/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norms[1](x))


class GPT(nn.Module):
    """Byte-level GPT with every kind of parameter ``param_groups`` routes: hidden matrices, token
    and position embeddings, a head tied to the token embedding, LayerNorm gains and biases."""

    def __init__(self, d: int = 32, layers: int = 2, heads: int = 2, seq_len: int = 16) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)
        self.head.weight = self.tok.weight  # tied: FSDP2 and ZeRO see one tensor under two names
        with torch.no_grad():
            for name, p in self.named_parameters():  # the tied weight is listed once
                if p.ndim == 2:
                    p.normal_(std=0.02)
                elif name.endswith("bias"):
                    p.zero_()

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1), target.flatten())


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "awkward":
        return Awkward()
    if name == "awkward-clipped":
        return Awkward(loss_scale=200.0)
    if name == "awkward-sometimes-clipped":  # c_t norms near 1: clipped on some steps, not others
        return Awkward(loss_scale=8.0)
    if name == "gpt":
        return GPT(d=32, layers=2, heads=2, seq_len=16)
    raise ValueError(name)


def batch(name: str, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    vocab, seq = (11, 5) if name.startswith("awkward") else (256, 16)
    x = torch.randint(0, vocab, (GLOBAL_BATCH, seq + 1), generator=gen)
    return x[:, :-1], x[:, 1:]


def shard(model: nn.Module, world_size: int) -> nn.Module:
    """fully_shard the inner modules, then the root (which takes the tied embedding/head)."""
    mesh = init_device_mesh("cpu", (world_size,))
    inner = list(model.blocks) if hasattr(model, "blocks") else [model.a, model.b, model.c]
    for m in inner:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_fsdp_x_tp(model: nn.Module) -> tuple[nn.Module, int, int]:
    """An ``Awkward`` model on a 2x2 (dp, tp) mesh, as torch's TP styles and ``fully_shard`` make it:
    (30, 16) column-parallel (blocks of 15 rows, then 8/7 rows per dp rank: ``_StridedShard``);
    (7, 30) row-parallel (column blocks of 15, rows 4/3); (3, 7) column-parallel (uneven blocks of
    2 and 1 rows; the second splits 1/0 over dp, so a rank holds nothing of it). The rest (AdamW
    branch) is only ``fully_shard``-ed over dp. Returns the model, its dp rank and dp size."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"a": ColwiseParallel(output_layouts=Replicate()),
                                           "b": RowwiseParallel(input_layouts=Replicate()),
                                           "c": ColwiseParallel(output_layouts=Replicate())})
    for m in (model.a, model.b, model.c, model):
        fully_shard(m, mesh=mesh["dp"])
    return model, mesh.get_local_rank("dp"), 2


def train(name, model, opt, steps, *, approx, rank=0, world_size=1, start=0, shadow=None):
    """``steps`` steps; each rank takes its slice of the global batch (FSDP2 averages grads).

    ``shadow`` = (plain model, its single-process MARSM): fed the sharded run's full gradients
    at every step, it isolates the optimizer from gradient rounding (see test_fsdp2.py)."""
    lo, hi = rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size
    for t in range(start, start + steps):
        if not approx:
            x, y = batch(name, t + 1)
            model(x[lo:hi], y[lo:hi]).backward()
            _mirror(model, shadow, "store_lookahead_grad")
            opt.store_lookahead_grad()
            opt.zero_grad()
        x, y = batch(name, t)
        model(x[lo:hi], y[lo:hi]).backward()
        _mirror(model, shadow, "step")
        opt.step()
        opt.zero_grad()


def _mirror(model, shadow, method: str) -> None:
    if shadow is None:
        return
    twin, twin_opt = shadow
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        full = p.grad.full_tensor() if p.grad is not None else None
        q.grad = full.clone() if full is not None else None
    getattr(twin_opt, method)()
    twin_opt.zero_grad()


def make_opt(model, **kw) -> MARSM:
    kw.setdefault("lr", 0.02)
    return MARSM(param_groups(model), **kw)


def reference(name: str, steps: int, *, approx: bool, **kw) -> dict[str, torch.Tensor]:
    """The single-process run the sharded one must reproduce."""
    model = build(name)
    train(name, model, make_opt(model, approx=approx, **kw), steps, approx=approx)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
