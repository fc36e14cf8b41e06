"""FSDP2 runs that must not hang or diverge: NaN on one rank, parameters without gradients, and
the bytes each rank moves (checked against a count made here from torch.chunk)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marsm_dist import NonFiniteGradError
from marsm_dist.newton_schulz import newton_schulz_flops
from tests.helpers import fsdp2_models as fm
from tests.helpers.distributed import run_distributed

pytestmark = pytest.mark.distributed


def local_state(opt):
    return {(id(p), k): (v.to_local() if hasattr(v, "to_local") else v).clone()
            for p, st in opt.state.items() for k, v in st.items() if torch.is_tensor(v)}


def nan_run(rank, world_size, on_nonfinite, where, bad_rank):
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, ns_dtype=torch.float32, on_nonfinite=on_nonfinite)
    fm.train("awkward", model, opt, 2, approx=True, rank=rank, world_size=world_size)
    before, state_before = fm.full_params(model), local_state(opt)
    x, y = fm.batch("awkward", 2)
    n = fm.GLOBAL_BATCH // world_size
    model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
    if rank == bad_rank:
        grad = dict(model.named_parameters())[where].grad.to_local()
        grad.view(-1)[0] = float("nan")
    try:
        opt.step()
        outcome = "stepped"
    except NonFiniteGradError as err:
        outcome = str(err)
    opt.zero_grad()
    after, state_after = fm.full_params(model), local_state(opt)
    unchanged = all(torch.equal(before[k], after[k]) for k in before) and all(
        torch.equal(state_before[k], state_after[k]) for k in state_before)
    # The next step runs normally on every rank: nobody is stuck in a collective.
    fm.train("awkward", model, opt, 1, approx=True, rank=rank, world_size=world_size, start=3)
    return outcome, unchanged, opt.skipped_steps


@pytest.mark.parametrize("where", ["b.weight", "norm.weight"])
def test_nan_on_one_rank_makes_every_rank_raise_and_changes_nothing(where):
    results = run_distributed(nan_run, 3, "raise", where, 1)
    for rank, (outcome, unchanged, _) in enumerate(results):
        assert "NaN or Inf" in outcome and unchanged, (rank, outcome)
    assert f"gradient of '{where}'" in results[1][0]
    assert "another rank" in results[0][0] and "another rank" in results[2][0]


def test_nan_on_one_rank_makes_every_rank_skip():
    for outcome, unchanged, skipped in run_distributed(nan_run, 2, "skip", "a.weight", 0):
        assert outcome == "stepped" and unchanged and skipped == 1


class Branchy(fm.Awkward):
    """A second head used on odd steps only: its weight has no gradient on even steps."""

    def __init__(self) -> None:
        super().__init__()
        self.head2 = nn.Linear(3, 11)
        self.mix = nn.Linear(3, 3, bias=False)
        self.t = 0

    def forward(self, idx, target):
        x = torch.tanh(self.norm(self.a(self.emb(idx))))
        h = torch.tanh(self.c(torch.tanh(self.b(x))))
        logits = self.head(h) if self.t % 2 == 0 else self.head2(torch.tanh(self.mix(h)))
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


def branchy_train(model, opt, rank, world_size, steps=6):
    n = fm.GLOBAL_BATCH // world_size
    for t in range(steps):
        model.t = t
        x, y = fm.batch("awkward", t)
        model(x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]).backward()
        opt.step()
        opt.zero_grad()


def branchy_run(rank, world_size):
    torch.manual_seed(0)
    model = fm.shard(Branchy(), world_size)
    opt = fm.make_opt(model, ns_dtype=torch.float32)
    branchy_train(model, opt, rank, world_size)
    return fm.full_params(model)


def test_parameters_without_gradients_match_single_process():
    """``mix`` (a MARS-M matrix) gets no gradient on even steps on any rank: it must sit out
    those steps exactly as in a single process (no decay, no momentum step), without a hang."""
    got = run_distributed(branchy_run, 3)[0]
    torch.manual_seed(0)
    ref = Branchy()
    branchy_train(ref, fm.make_opt(ref, ns_dtype=torch.float32), 0, 1)
    for n, p in ref.named_parameters():
        assert (got[n] - p.detach()).abs().max() < 1e-5, n


def bytes_run(rank, world_size, ns_dtype):
    model = fm.shard(fm.build("awkward"), world_size)
    opt = fm.make_opt(model, ns_dtype=ns_dtype, owner_policy="round_robin")
    fm.train("awkward", model, opt, 1, approx=True, rank=rank, world_size=world_size)
    s = opt.last_step_stats
    return s.bytes_sent, s.bytes_received, s.owned_matrices, s


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_rank_equal_the_analytic_count(world_size, ns_dtype):
    shapes = [(30, 16), (7, 30), (3, 7)]  # the MARS-M matrices of Awkward, in order
    itemsize = 4 if ns_dtype == torch.float32 else 2  # bf16 NS: bf16 on the wire
    results = run_distributed(bytes_run, world_size, ns_dtype)
    for rank, (sent, received, owned, _) in enumerate(results):
        want = 0
        for i, (rows, cols) in enumerate(shapes):
            chunks = [c.numel() for c in torch.arange(rows).chunk(world_size)]
            mine = (chunks[rank] if rank < len(chunks) else 0) * cols
            # round_robin: matrix i belongs to rank i % W; an owner receives (then sends back)
            # everything it does not hold, every other rank sends (then receives) its shard.
            want += (rows * cols - mine) if i % world_size == rank else mine
        assert sent == received == want * itemsize
        assert owned == sum(1 for i in range(len(shapes)) if i % world_size == rank)
    # Diagnostics: every phase timed; the plan's NS FLOPs add up to the hand count and their
    # balance is what the ranks report.
    stats = [r[3] for r in results]
    flops = [newton_schulz_flops(s) for s in shapes]
    assert sum(s.ns_flops_this_rank for s in stats) == sum(flops)
    per_rank = [sum(f for i, f in enumerate(flops) if i % world_size == r) for r in range(world_size)]
    assert stats[0].ns_flops_max_over_mean == pytest.approx(max(per_rank) / (sum(flops) / world_size))
    for s in stats:
        assert set(s.milliseconds) == {"elementwise", "communication", "newton_schulz", "apply"}
        assert s.milliseconds["communication"] > 0 and all(v >= 0 for v in s.milliseconds.values())
