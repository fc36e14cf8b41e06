"""param_groups(model): which parameter goes to which branch, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marsm_dist import MARSM, explain_routing, param_groups


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, d=16, tied=True):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(torch.zeros(8, d))
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d, bias=False)})
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok_embeddings.weight

    def forward(self, idx):
        x = self.tok_embeddings(idx) + self.pos_embed[: idx.shape[1]]
        x = x + self.attn["proj"](self.attn["qkv"](self.norm(x))[..., : x.shape[-1]])
        return self.lm_head(x + self.mlp(x))


def routes(model, **kw):
    return {d.name: d.use_marsm for d in explain_routing(model, **kw)}


@pytest.mark.parametrize("tied", [True, False])
def test_transformer_routing(tied):
    model = TinyGPT(tied=tied)
    r = routes(model)
    assert r["tok_embeddings.weight"] is False
    assert r["pos_embed"] is False
    assert r["attn.qkv.weight"] is True and r["attn.proj.weight"] is True
    assert r["mlp.0.weight"] is True and r["mlp.2.weight"] is True
    assert r["attn.qkv.bias"] is False and r["norm.weight"] is False and r["norm.bias"] is False
    if tied:  # one tensor, listed once, under the embedding, with the alias in the reason
        assert "lm_head.weight" not in r
        why = {d.name: d.reason for d in explain_routing(model)}["tok_embeddings.weight"]
        assert "tied: lm_head.weight" in why
    else:
        assert r["lm_head.weight"] is False


def test_head_names_only_where_they_mean_a_head():
    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleDict({"output": nn.Linear(4, 4)})])
            self.output = nn.Linear(4, 9)
            self.decoder = nn.ModuleDict({"output_layer": nn.Linear(4, 9)})

    r = routes(Llama())
    assert r["output.weight"] is False  # top-level "output": the head
    assert r["layers.0.output.weight"] is True  # nested "output" (BERT-style): a hidden matrix
    assert r["decoder.output_layer.weight"] is False  # Megatron's name, anywhere


def test_overrides_frozen_and_errors():
    model = TinyGPT(tied=False)
    model.mlp[0].weight.requires_grad_(False)
    r = routes(model, adamw=["attn.proj.*"], marsm=["lm_head.weight"])
    assert r["attn.proj.weight"] is False and r["lm_head.weight"] is True
    assert r["mlp.0.weight"] is None
    with pytest.raises(ValueError, match="norm.weight.*at least 2 dims"):
        routes(model, marsm=["norm.*"])


def test_groups_feed_marsm_with_names_and_the_report_prints(capsys):
    model = TinyGPT()
    groups = param_groups(model, report=True, adamw_options={"weight_decay": 0.0})
    out = capsys.readouterr().out
    assert "tok_embeddings.weight" in out and "MARS-M: 4 tensors" in out and "AdamW" in out
    assert [g["use_marsm"] for g in groups] == [True, False]
    assert groups[1]["weight_decay"] == 0.0
    opt = MARSM(groups, lr=0.01)
    assert opt.param_groups[0]["param_names"] == [
        "attn.qkv.weight", "attn.proj.weight", "mlp.0.weight", "mlp.2.weight"]
    loss = model(torch.randint(0, 50, (2, 8))).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert all(len(opt.state[p]) > 0 for g in opt.param_groups for p in g["params"])
    unnamed = param_groups(model, named=False)
    assert all(isinstance(p, torch.Tensor) for g in unnamed for p in g["params"])


class _Experts(nn.Module):
    """Stacked expert weights: a class named ``*Experts`` (torchtitan, HF transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 6, 5))
        self.w1_bias = nn.Parameter(torch.randn(4, 6))


class _Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(5, 4, bias=False)
        self.experts = _Experts()
        self.custom = nn.Parameter(torch.randn(4, 5, 5))  # stacked, but no class says so
        self.proj = nn.Linear(5, 5)


class GroupedMLP(nn.Module):
    """Megatron's legacy GroupedMLP: all local experts side by side in one 2-D weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight1 = nn.Parameter(torch.randn(5, 4 * 6))


def test_moe_experts_go_to_an_experts_group_biases_and_routers_to_adamw():
    groups = param_groups(_Moe(), experts=["custom"])
    names = [(sorted(n for n, _ in g["params"]), g["use_marsm"], g.get("experts")) for g in groups]
    assert names == [(["proj.weight"], True, None), (["custom", "experts.w1"], True, True),
                     (["experts.w1_bias", "proj.bias", "router.weight"], False, None)]
    reasons = {d.name: d.reason for d in explain_routing(_Moe())}
    assert "router" in reasons["router.weight"] and "per-expert bias" in reasons["experts.w1_bias"]
    assert reasons["custom"].startswith("hidden matrix")  # without the pattern: the spec's 3-D tensor


def test_megatron_legacy_grouped_mlp_is_refused_not_orthogonalized_as_one_matrix():
    with pytest.raises(ValueError, match="GroupedMLP.*SequentialMLP"):
        param_groups(GroupedMLP())
    assert param_groups(GroupedMLP(), adamw=["weight1"])[0]["use_marsm"] is False
