"""The suite must catch real mistakes: plant each one in a copy of the package and expect a failure.

Each mutant is a one-line change that a plausible implementation could get wrong (the spec calls
most of them out). The unmutated copy runs first as a control, so a broken harness cannot pass
as "every mutant was caught".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["tests/test_trajectory.py", "tests/test_optimizer_api.py", "tests/test_newton_schulz.py"]

MUTANTS = {
    "no clip of c_t": (
        "marsm_dist/functional.py",
        "return [1.0 / n if n > 1.0 else 1.0 for n in norms]",
        "return [1.0 for n in norms]",
    ),
    "torch.optim.AdamW's eps placement": (
        "marsm_dist/functional.py",
        "    torch._foreach_add_(denom, eps)\n"
        "    step_sizes = [-lr * math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k) for k in steps]",
        "    torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**k) for k in steps])\n"
        "    torch._foreach_add_(denom, eps)\n"
        "    step_sizes = [-lr / (1.0 - beta1**k) for k in steps]",
    ),
    "P aliases .grad in approx mode": (
        "marsm_dist/_step_phases.py",
        "                torch._foreach_copy_([prev[j] for j in js], gs)\n",
        "                for j, g_ in zip(js, gs, strict=True):\n"
        '                    state[work.params[j]]["last_grad"] = g_\n',
    ),
    "exact mode uses the new look-ahead at once": (
        "marsm_dist/_step_guards.py",
        '        prev = work.local_state(state, "last_grad")\n',
        '        prev = work.local_state(state, "last_grad" if work.group["approx"] else "lookahead_grad")\n',
    ),
    "exact mode uses the new look-ahead at once, where c_t is recomputed": (
        "marsm_dist/_step_phases.py",
        'prev, exp_avgs = work.local_state(state, "last_grad"),',
        'prev, exp_avgs = work.local_state(state, "last_grad" if g["approx"] else "lookahead_grad"),',
    ),
    "kappa without beta": (
        "marsm_dist/functional.py",
        "return gamma * momentum / (1.0 - momentum)",
        "return gamma / (1.0 - momentum)",
    ),
    "scale from min(A, B)": (
        "marsm_dist/functional.py",
        "0.2 * math.sqrt(max(shape[0], shape[1]))",
        "0.2 * math.sqrt(min(shape[0], shape[1]))",
    ),
    "weight decay with the scaled lr": (
        "marsm_dist/functional.py",
        "p.mul_(1.0 - lr * weight_decay)",
        "p.mul_(1.0 - lr * s * weight_decay)",
    ),
    "per-matrix norm for >2-D tensors": (
        "marsm_dist/orthogonalize.py",
        'coefficients=cfg.coefficients, norm_over="tensor"',
        'coefficients=cfg.coefficients, norm_over="matrix"',
    ),
    "shard-local clip norm (no all-reduce)": (
        "marsm_dist/sharding/distributor.py",
        "        dist.all_reduce(out, group=self.group)\n",
        "",
        ["tests/test_fsdp2.py"],
    ),
    "stacked experts stepped as one 3-D tensor (one clip norm and one NS normalization for all)": (
        "marsm_dist/_step_work.py",
        'if group.get("experts") and len(slot.shape) >= 3:',
        "if False:",
        ["tests/test_moe_fsdp2.py::test_experts_group_in_one_process_equals_separate_matrices"],
    ),
    "no locality in the owner plan (experts gathered away from the ranks that hold them)": (
        "marsm_dist/sharding/engine.py",
        "candidates=[lay.preferred_owners for lay in layouts]",
        "candidates=None",
        ["tests/test_moe_fsdp2.py::test_expert_parallel_experts_are_orthogonalized_where_they_live"],
    ),
    "every replica adds its norm (replicated matrices clipped by sqrt(copies) x their norm)": (
        "marsm_dist/_step_guards.py",
        "here = host_tensor([1.0 if distributor.counts_here(index[k]) else 0.0 for k in shared], device)",
        "here = host_tensor([1.0 for k in shared], device)",
        ["tests/test_topologies.py"],
    ),
    "every bucket's results held to the end of the step": (
        "marsm_dist/sharding/engine.py",
        "        got = iter(r.spreading)\n",
        "        self.__dict__.setdefault('_held', []).append(r.shards)\n        got = iter(r.spreading)\n",
        ["tests/test_device_paths.py"],
    ),
    "balanced owners with rounds cut in index order": (
        "marsm_dist/sharding/plan.py",
        "        owners, buckets = plan_rounds(costs, numels, world_size, bucket_numel)\n",
        "        owners = plan_owners(costs, world_size, policy)\n"
        "        buckets = plan_buckets(numels, owners, world_size, bucket_numel)\n",
        ["tests/test_sharding_plan.py"],
    ),
    "a team member's columns put back in another member's place": (
        "marsm_dist/sharding/team_runner.py",
        "        lo, hi = min(j * width, n), min((j + 1) * width, n)\n",
        "        lo, hi = min((k - 1 - j) * width, n), min((k - j) * width, n)\n",
        ["tests/test_split_newton_schulz.py"],
    ),
    "a host read per matrix": (
        "marsm_dist/_step_guards.py",
        "    clipped = sum(1 for k, f in enumerate(factors) if active[k] and f < 1.0)\n",
        "    clipped = sum(1 for k, f in enumerate(factors) if active[k] and f < 1.0)\n"
        "    clipped += sum(int(bool(x > 1.0)) * 0 for x in norms)\n",
        ["tests/test_device_paths.py"],
    ),
    "a frozen group counts its steps after the first write (and crashes there)": (
        "marsm_dist/_step_phases.py",
        "        if not containers:  # a group none of whose matrices got a gradient anywhere: nothing "
        "to count\n            continue\n",
        "",
        ["tests/test_no_half_done_step.py::test_fsdp2_frozen_group"],
    ),
    "a stale plan found only by the exchange, after the first write": (
        "marsm_dist/_step_guards.py",
        "    stale = work.step_map.stale_part(work.matrix)\n",
        "    stale = None\n",
        ["tests/test_no_half_done_step.py::test_a_stale_plan_is_refused_before_the_first_write"],
    ),
    "replica broadcasts posted by this rank's own bytes": (
        "marsm_dist/sharding/exchange.py",
        "schedule = sum(items[k][0].max_local_numel for k in owned)",
        "schedule = sum(items[k][0].local_numel(me) for k in owned)",
        ["tests/test_collective_order.py::test_replica_broadcasts_are_posted_in_the_same_order_on_every_rank"],
    ),
    "team groups made by their members only": (
        "marsm_dist/sharding/subgroups.py",
        "            g = dist.new_group(list(s))\n",
        "            g = dist.new_group(list(s), use_local_synchronization=True) if me in s else None\n",
        ["tests/test_collective_order.py::test_two_team_plans_on_the_fake_group"],
    ),
    "hyperparameters compared by their repr": (
        "marsm_dist/sharding/agreement.py",
        "    if isinstance(value, Tensor) and value.numel() == 1:\n        value = float(value)",
        "    if isinstance(value, Tensor):\n        value = repr(value)",
        ["tests/test_hyperparameter_tensors.py::test_values_are_compared_exactly"],
    ),
    "FSDP2 state as plain local tensors": (
        "marsm_dist/adapters/fsdp2.py",
        "        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,\n"
        "                                  shape=p.shape, stride=p.stride())",
        "        return local",
        ["tests/test_fsdp2_checkpoint.py"],
    ),
}


def run_suite(tree: Path, suite: list[str] = SUITE) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *suite]
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("mutant")
    for part in ("marsm_dist", "tests"):
        shutil.copytree(ROOT / part, dst / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst)
    return dst


@pytest.mark.slow
def test_control_copy_passes_and_is_the_one_imported(tree):
    probe = subprocess.run([sys.executable, "-c", "import marsm_dist; print(marsm_dist.__file__)"],
                           cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(tree))
    result = run_suite(tree)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_mutant_is_caught(tree, mutant):
    path, old, new, *suite = MUTANTS[mutant]
    target = tree / path
    original = target.read_text()
    assert original.count(old) == 1, f"mutation site for {mutant!r} not found exactly once"
    target.write_text(original.replace(old, new))
    try:
        result = run_suite(tree, *suite)
    finally:
        target.write_text(original)
    out = result.stdout
    assert result.returncode == 1 and " failed" in out and "error" not in out.splitlines()[-1], out[-3000:]
