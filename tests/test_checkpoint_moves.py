"""A run stops under one framework and shape and continues under another, its MARS-M state moved
in the neutral form (``marsm_dist.checkpoint``): real DeepSpeed ZeRO, FSDP2, DDP and FSDP2 x TP
process groups on gloo. Each resumed run is compared with an uninterrupted run of the new kind and
shape, and with the single-process reference; a resume without the optimizer state must miss."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from tests.helpers import fsdp2_models as fm  # noqa: E402
from tests.helpers import moves  # noqa: E402
from tests.helpers.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed
STOP, MORE = 4, 4


def _largest(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


MOVES = [
    ("ds-z2", 2, "ds-z3", 3),  # another world size and ZeRO stage
    ("ds-z2", 2, "ds-z1", 1),
    ("fsdp2", 2, "ds-z3", 3),  # another framework
    ("ds-z3", 3, "fsdp2", 2),
    ("ddp", 2, "fsdp2xtp", 4),  # replicated -> 2-D (dp x tp) sharding
    ("fsdp2xtp", 4, "ds-z2", 2),  # 2-D sharding, with copies over tp, -> flat partitions
]


@pytest.mark.parametrize(("src", "src_w", "dst", "dst_w"), MOVES,
                         ids=[f"{a}{b}-to-{c}{d}" for a, b, c, d in MOVES])
def test_a_run_continues_its_trajectory_under_another_framework_or_shape(tmp_path, src, src_w, dst, dst_w):
    manifest = run_distributed(moves.stop, src_w, src, str(tmp_path), STOP, timeout=240)[0]
    assert manifest["world_size"] == src_w and {e["step"] for e in manifest["params"].values()} == {STOP}
    branches = {n: e["branch"] for n, e in manifest["params"].items()}
    assert branches == {"a.weight": "marsm", "b.weight": "marsm", "c.weight": "marsm", "emb.weight": "adamw",
                        "a.bias": "adamw", "b.bias": "adamw", "norm.weight": "adamw", "norm.bias": "adamw",
                        "head.weight": "adamw", "head.bias": "adamw"}
    reference = fm.reference(moves.NAME, STOP + MORE, approx=True, ns_dtype=torch.float32)
    for result in run_distributed(moves.resume, dst_w, dst, str(tmp_path), STOP, MORE, timeout=300):
        assert _largest(result["resumed"], result["straight"]) < 1e-5
        assert _largest(result["resumed"], reference) < 1e-5


def test_without_the_optimizer_state_the_run_would_not_continue(tmp_path):
    """The control: the same move with fresh optimizer state misses the uninterrupted run by far."""
    run_distributed(moves.stop, 2, "ds-z2", str(tmp_path), STOP, timeout=240)
    fresh = run_distributed(moves.resume, 2, "fsdp2", str(tmp_path), STOP, MORE, False, timeout=240)[0]
    assert _largest(fresh["resumed"], fresh["straight"]) > 1e-3


@pytest.mark.parametrize("kind", ["ds-z2-bf16", "ds-z3-bf16"])
def test_bf16_master_weights_travel_with_weights_true(tmp_path, kind):
    """DeepSpeed bf16 keeps fp32 master weights that the model's bf16 weights round: with
    ``weights=True`` they travel and the run continues bitwise; without, it does not (the control)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_distributed(moves.stop, 2, kind, a, STOP, True, timeout=240)
    exact = run_distributed(moves.resume, 2, kind, a, STOP, MORE, True, True, timeout=240)
    run_distributed(moves.stop, 2, kind, b, STOP, False, timeout=240)
    rounded = run_distributed(moves.resume, 2, kind, b, STOP, MORE, True, False, timeout=240)
    assert all(_largest(r["resumed"], r["straight"]) == 0.0 for r in exact)
    assert all(_largest(r["resumed"], r["straight"]) > 1e-3 for r in rounded)
