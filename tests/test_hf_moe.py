"""Mixture-of-experts models of Hugging Face transformers (``*Experts`` modules) under MARS-M.

Single process, tiny ``qwen3_moe``, ``mixtral`` and ``gpt_oss``: :func:`param_groups` sends the
stacked expert tensors to a group with ``experts=True`` (per-expert biases, the router, embeddings
and the head to AdamW), and a few real training steps with ``MARSM(param_groups(model))`` land on
the weights of an independent float64 re-implementation of the spec that steps every expert as a
2-D matrix of its own (its own clip, Newton-Schulz and scale); the same tensors without
``experts=True`` follow the spec's whole-tensor semantics instead, which lands elsewhere.

Two ranks, FSDP2 through Accelerate: the Trainer recipe (``integrations/hf/train_fsdp2.py
--model moe``) on a tiny ``qwen3_moe`` gives the losses and final weights of one process with the
whole batch, and its experts, each held whole by one rank, are orthogonalized where they lie.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")  # the [clients] extra; launch/setup.sh installs it

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from marsm_dist import MARSM, param_groups  # noqa: E402
from tests.helpers.launch_env import launcher_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "integrations" / "hf"
sys.path.insert(0, str(RECIPES))
from common import tiny_moe  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=64, head_dim=8, max_position_embeddings=64)
ARCHS = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
# Where each architecture keeps its router (gpt_oss also gives its experts biases).
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "mlp.gate", "gpt_oss": "mlp.router"}
EXPERT_TENSORS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
EXPERTS, LAYERS = 4, 2

STEPS, LR, WD = 8, 2e-2, 0.1
# The loss is multiplied by these, step by step, so that some matrices' c_t are clipped on some
# steps only (the tiny models' expert gradients are ~0.01 in norm, far below the clip at 1).
LOSS_SCALES = (1.0, 150.0, 1.0, 40.0, 400.0, 3.0, 1500.0, 1.0)


def tiny_moe_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **ARCHS[arch]))


# ------------------------------------------------------------ routing
@pytest.mark.parametrize("arch", list(ARCHS))
def test_param_groups_put_each_moe_tensor_where_it_belongs(arch):
    model = tiny_moe_model(arch)
    groups = param_groups(model)
    where = {}
    for g in groups:
        label = "experts" if g.get("experts") else "marsm" if g["use_marsm"] else "adamw"
        where.update({name: label for name, _ in g["params"]})
    assert sorted(where) == sorted(n for n, _ in model.named_parameters())
    kinds = [(g["use_marsm"], bool(g.get("experts"))) for g in groups]
    assert kinds == [(True, False), (True, True), (False, False)]
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        for name in EXPERT_TENSORS:
            assert where[layer + name] == "experts"
            assert model.get_parameter(layer + name).shape[0] == EXPERTS
        assert where[f"{layer}{ROUTER[arch]}.weight"] == "adamw"
        for proj in "qkvo":
            assert where[f"{layer}self_attn.{proj}_proj.weight"] == "marsm"
    assert where["model.embed_tokens.weight"] == "adamw" and where["lm_head.weight"] == "adamw"
    biases = [n for n in where if n.endswith("_proj_bias")]
    assert len(biases) == (2 * LAYERS if arch == "gpt_oss" else 0)
    assert all(where[n] == "adamw" for n in biases)
    assert {n for n, w in where.items() if w == "experts"} == {f"model.layers.{i}.{t}" for i in range(LAYERS)
                                                               for t in EXPERT_TENSORS}
    # Everything not a hidden matrix or an expert tensor is AdamW.
    assert all(w == "adamw" for n, w in where.items()
               if model.get_parameter(n).dim() < 2 or "embed" in n or "lm_head" in n or "router" in n)


# ------------------------------------------------------------ a float64 re-implementation
NS_ABC = (3.4445, -4.7750, 2.0315)


def _ns64(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Spec section 4 in float64; a 3-D tensor is a batch over its last two dims, normalized by the
    norm of the whole tensor (the spec's semantics for a tensor with more than 2 dims)."""
    a, b, c = NS_ABC
    x = m.double()
    tall = x.shape[-2] > x.shape[-1]  # work on the transpose: the smaller Gram matrix
    x = x.mT if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class Float64Reference:
    """MARS-M (spec section 9, approximate mode, default hyperparameters) in float64, on float64
    copies of ``model``'s weights, fed the gradients the model's own backward leaves in ``.grad``.

    The routing is decided here from the names: ``mlp.experts.gate_up_proj`` / ``down_proj`` are
    matrices per expert (``per_expert=True``: ``w[e]`` is a matrix of its own) or one 3-D tensor
    (``per_expert=False``: the whole-tensor clip, normalization and scale), other 2-D weights are
    matrices unless they are the embedding, the head, the router or a per-expert bias, and the
    rest is AdamW."""

    def __init__(self, model: torch.nn.Module, *, lr: float, weight_decay: float, per_expert: bool) -> None:
        self.lr, self.wd, self.per_expert = lr, weight_decay, per_expert
        self.beta, self.kappa = 0.95, 0.025 * 0.95 / 0.05
        self.betas, self.eps = (0.9, 0.95), 1e-8
        self.weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        self.kind = {n: self._route(n, w) for n, w in self.weights.items()}
        self.state: dict[str, dict] = {n: {} for n in self.weights}
        self.clipped: list[int] = []  # matrices (experts counted one by one) clipped, per step
        self.mixed: list[bool] = []  # per step: an expert tensor with some experts clipped, not all

    @staticmethod
    def _route(name: str, w: torch.Tensor) -> str:
        if any(name.endswith(t) for t in EXPERT_TENSORS):
            return "experts"
        hidden = not any(k in name for k in ("embed", "lm_head", "mlp.gate.", "mlp.router.", "bias"))
        return "matrix" if w.dim() == 2 and hidden else "adamw"

    @torch.no_grad()
    def step(self, model: torch.nn.Module) -> None:
        clipped, mixed = 0, False
        for name, p in model.named_parameters():
            w, g, st = self.weights[name], p.grad.double(), self.state[name]
            kind = self.kind[name]
            w.mul_(1 - self.lr * self.wd)
            if kind == "adamw":
                k = st["k"] = st.get("k", 0) + 1
                m = st["m"] = self.betas[0] * st.get("m", torch.zeros_like(g)) + (1 - self.betas[0]) * g
                v = st["v"] = self.betas[1] * st.get("v", torch.zeros_like(g)) + (1 - self.betas[1]) * g * g
                bias_correction = math.sqrt(1 - self.betas[1] ** k) / (1 - self.betas[0] ** k)
                w.sub_(self.lr * bias_correction * m / (self.eps + v.sqrt()))
                continue
            c = g + self.kappa * (g - st.get("P", torch.zeros_like(g)))
            st["P"] = g
            m = st.setdefault("M", torch.zeros_like(g))
            flags = []
            for e in range(len(w)) if kind == "experts" and self.per_expert else [slice(None)]:
                norm = c[e].norm().item()
                flags.append(norm > 1.0)
                m[e] = self.beta * m[e] + (1 - self.beta) * (c[e] / norm if norm > 1.0 else c[e])
                rows, cols = w[e].shape[:2]  # a whole 3-D tensor: (E, rows), as the spec says
                w[e] -= self.lr * 0.2 * math.sqrt(max(rows, cols)) * _ns64(m[e])
            clipped += sum(flags)
            mixed |= len(set(flags)) > 1
        self.clipped.append(clipped)
        self.mixed.append(mixed)

    def max_diff(self, model: torch.nn.Module) -> float:
        return max((p.double() - self.weights[n]).abs().max().item() for n, p in model.named_parameters())


def _train(model: torch.nn.Module, opt: MARSM, ref: Float64Reference, seed: int = 7) -> list[int]:
    """STEPS real steps on random tokens, the loss scaled per step; ``ref`` is fed the gradients
    that ``opt`` steps with. Returns ``opt``'s clipped count per step."""
    tokens = torch.Generator().manual_seed(seed)
    clipped = []
    for scale in LOSS_SCALES[:STEPS]:
        ids = torch.randint(0, COMMON["vocab_size"], (4, 16), generator=tokens)
        (model(input_ids=ids, labels=ids).loss * scale).backward()
        ref.step(model)
        opt.step()
        model.zero_grad(set_to_none=True)
        clipped.append(opt.last_step_stats.clipped)
    return clipped


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_expert_steps_as_its_own_matrix(arch):
    """MARSM over param_groups(model) == the float64 spec with every expert a separate matrix."""
    start = tiny_moe_model(arch)
    model, whole = copy.deepcopy(start), copy.deepcopy(start)

    opt = MARSM(param_groups(model), lr=LR, weight_decay=WD, ns_dtype=torch.float32)
    ref = Float64Reference(model, lr=LR, weight_decay=WD, per_expert=True)
    clipped = _train(model, opt, ref)
    assert _max_diff(model, start) > 1e-2  # the weights really moved ...
    assert ref.max_diff(model) < 1e-5  # ... to the per-expert reference's
    # The clip fired on some steps only, for the same matrices (each expert counted) as the
    # reference's; on some step an expert tensor had some experts clipped and others not.
    assert clipped == ref.clipped, (clipped, ref.clipped)
    assert len(set(clipped)) > 2 and min(clipped) == 0, clipped
    assert any(ref.mixed), ref.clipped

    # The same expert tensors without experts=True take the spec's whole-tensor semantics (one clip
    # norm and one Newton-Schulz normalization over all experts, scale from (E, rows)): another
    # trajectory, which MARSM also follows.
    groups = [{k: v for k, v in g.items() if k != "experts"} for g in param_groups(whole)]
    opt_whole = MARSM(groups, lr=LR, weight_decay=WD, ns_dtype=torch.float32)
    ref_whole = Float64Reference(whole, lr=LR, weight_decay=WD, per_expert=False)
    assert _train(whole, opt_whole, ref_whole) == ref_whole.clipped
    assert ref_whole.max_diff(whole) < 1e-5
    assert _max_diff(whole, model) > 1e-3  # so the per-expert check above could fail


# ------------------------------------------------------------ the FSDP2 recipe, at 2 ranks
RECIPE_STEPS = 6
ATTENTION_NUMEL = LAYERS * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)  # q, k, v, o of common.tiny_moe


def _run_recipe(script: str, out: Path, *, procs: int, batch: int) -> dict:
    """torchrun ``script --model moe`` (through tests/helpers/hf_cpu_run.py at several ranks, as
    tests/test_hf_trainer.py does); rank 0's JSON with every rank's MARS-M figures in "ranks"."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd += [str(ROOT / "tests" / "helpers" / "hf_cpu_run.py")] if procs > 1 else []
    log = out.parent / f"{out.name}.json"
    cmd += [str(RECIPES / script), "--model", "moe", "--output-dir", str(out), "--steps", str(RECIPE_STEPS),
            "--save-steps", str(RECIPE_STEPS), "--ns-dtype", "float32", "--batch-size", str(batch),
            "--log-json", str(log)]
    env = launcher_env(PYTHONPATH=str(ROOT), HF_CPU_DISTRIBUTED_TYPE="MULTI_GPU")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    result = json.loads(log.read_text())
    result["ranks"] = [result["marsm"]] + [json.loads(Path(f"{log}.rank{r}").read_text())["marsm"]
                                           for r in range(1, procs)]
    return result


def _final_weights(out: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's model weights: the Trainer's safetensors (one process, read back
    through transformers, which re-fuses the experts it saves one by one) or Accelerate's sharded
    DCP checkpoint (FSDP2), converted to one file."""
    checkpoint = out / f"checkpoint-{RECIPE_STEPS}"
    if (checkpoint / "model.safetensors").exists():
        return AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", tmp_path / "fsdp2.pt")
    return torch.load(tmp_path / "fsdp2.pt", weights_only=True)["model"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fsdp2_recipe_trains_the_moe_model_as_one_process_does(tmp_path):
    """train_fsdp2.py --model moe at 2 ranks (8 sequences each) == train_ddp.py --model moe in one
    process (16): the same losses and final weights (float32 Newton-Schulz; reductions summed in
    another order), and the experts, each held whole by one rank, orthogonalized in place."""
    single = _run_recipe("train_ddp.py", tmp_path / "w1", procs=1, batch=16)
    sharded = _run_recipe("train_fsdp2.py", tmp_path / "w2", procs=2, batch=8)

    losses = {row["step"]: row["loss"] for row in sharded["losses"]}
    reference = {row["step"]: row["loss"] for row in single["losses"]}
    assert sorted(losses) == list(range(1, RECIPE_STEPS + 1)) and sorted(reference) == sorted(losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(reference[step], rel=1e-5, abs=1e-5), step

    weights, expected = _final_weights(tmp_path / "w2", tmp_path), _final_weights(tmp_path / "w1", tmp_path)
    assert sorted(weights) == sorted(expected)
    start = tiny_moe(0).state_dict()
    for name, w in expected.items():
        assert (w - start[name]).abs().max() > 1e-2, name  # it trained
        assert torch.allclose(weights[name], w, rtol=0, atol=1e-5), (name, (weights[name] - w).abs().max())

    # 8 attention matrices (rows split over the 2 ranks) + 2 layers x 2 tensors x 4 experts, each
    # expert one matrix of its own; every rank orthogonalizes half of them.
    stats = sharded["ranks"]
    assert all(s["sharded_matrices"] == 8 + 16 for s in stats)
    assert sorted(s["owned_matrices"] for s in stats) == [12, 12]
    # Bytes: each attention matrix's owner receives the other rank's half of its momentum and sends
    # back that half of the update (float32), i.e. its numel x 4 bytes sent in all, and nothing
    # else crossed: the experts (2 whole ones of each tensor per rank) moved 0 bytes.
    sent, received = (sum(s[k] for s in stats) for k in ("bytes_sent", "bytes_received"))
    assert sent == received == 4 * ATTENTION_NUMEL, (sent, received)
