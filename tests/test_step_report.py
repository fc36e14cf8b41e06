"""``step_stats`` finds every MARSM inside a framework's wrappers and adds their figures up."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from marsm_dist import MARSM, marsm_optimizers, step_stats


def _stepped(seed: int) -> MARSM:
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = MARSM([w], ns_dtype="float32")
    w.grad = torch.randn_like(w)
    opt.step()
    return opt


def test_every_marsm_inside_nested_wrappers_is_found_once_and_the_figures_add_up():
    a, b, c = _stepped(0), _stepped(1), _stepped(2)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    # Shapes that frameworks use: Accelerate/DeepSpeed (.optimizer), Megatron's ChainedOptimizer
    # (.chained_optimizers), torchtitan's container (.optimizers), and the same MARSM twice.
    wrapper = SimpleNamespace(optimizer=SimpleNamespace(
        chained_optimizers=[SimpleNamespace(optimizer=a), other,
                            SimpleNamespace(optimizers={"x": b, "y": a})],
        basic_optimizer=c))
    found = marsm_optimizers(wrapper)
    assert len(found) == 3 and {id(o) for o in found} == {id(a), id(b), id(c)}
    total = step_stats(wrapper)
    assert total.calls == 3
    assert total.ns_flops_this_rank == sum(o.last_step_stats.ns_flops_this_rank for o in (a, b, c)) > 0
    assert total.milliseconds["newton_schulz"] == sum(o.last_step_stats.milliseconds["newton_schulz"]
                                                      for o in (a, b, c))
    assert step_stats(a) is a.last_step_stats


def test_no_stats_before_a_step_and_none_without_marsm():
    w = torch.nn.Parameter(torch.randn(4, 4))
    assert step_stats(SimpleNamespace(optimizer=MARSM([w]))) is None
    assert step_stats(torch.optim.SGD([w], lr=0.1)) is None
    assert marsm_optimizers(None) == []
