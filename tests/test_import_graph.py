"""The package's import structure: no circles, no import up a floor, no side effects on import.

The floors, from the bottom: math (no ``torch.distributed``) -> sharding -> optimizer -> adapters
-> entry points (the package itself, the demo and command lines). A module may import its own floor and those
below. The graph is read from the source (AST), so imports under ``TYPE_CHECKING`` and inside
functions count too. Run this file as a script to print the graph's report.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "marsm_dist"

# The modules at the top of the package that make up the math floor: they know no ranks.
MATH = {"newton_schulz", "ns_coefficients", "ns_products", "lr_scale", "functional", "param_groups",
        "orthogonalize", "stats", "_timing"}
FLOORS = ("math", "sharding", "optimizer", "adapters", "entry")
# Command lines inside a package (``python -m marsm_dist.checkpoint``): entry points, which may
# ask an adapter to read its framework's files.
ENTRY_MODULES = ("cli", "__main__")


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def floor(name: str) -> str:
    """The floor of module ``name`` (from where it sits in the package)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] == "demo" or parts[-1] in ENTRY_MODULES:
        return "entry"
    if parts[1] in ("sharding", "adapters"):
        return parts[1]
    return "math" if parts[1] in MATH else "optimizer"


def _imported(node: ast.AST, name: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The package's modules one import statement names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = set()
    for alias in node.names:  # `from pkg import module` imports the module, else the names' module
        sub = f"{target}.{alias.name}"
        found.add(sub if sub in known else target)
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    known = modules()
    graph = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        found = {m for node in ast.walk(tree) for m in _imported(node, name, is_package, known)}
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a (floor) -> b (floor)`` for every import of a higher floor."""
    rank = {f: i for i, f in enumerate(FLOORS)}
    return [f"{a} ({floor(a)}) -> {b} ({floor(b)})" for a in sorted(graph) for b in sorted(graph[a])
            if rank[floor(b)] > rank[floor(a)]]


def test_the_package_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_no_module_imports_a_floor_above_its_own():
    assert upward_imports(import_graph()) == []


def test_the_steps_three_modules_are_siblings():
    """Work collection, the guards and the phases: none imports another (optimizer.py joins them)."""
    graph = import_graph()
    step = {"marsm_dist._step_work", "marsm_dist._step_guards", "marsm_dist._step_phases"}
    assert step <= set(graph)
    assert {m for m in graph if m.startswith("marsm_dist._step")} == step  # and no fourth
    for name in step:
        assert not graph[name] & step, (name, graph[name] & step)


def test_the_math_floor_knows_no_ranks():
    for name, path in modules().items():
        if floor(name) == "math":
            assert "torch.distributed" not in path.read_text(), name


# Run in a fresh interpreter: what `import marsm_dist` does, and then what the first lookup does.
_PROBE = r"""
import json, sys, importlib.util
import torch
import marsm_dist
from marsm_dist.sharding.adapter import adapter_for, registered_adapters

out = {"frameworks": [m for m in ("deepspeed", "megatron", "transformers") if m in sys.modules],
       "adapters_package": "marsm_dist.adapters" in sys.modules,
       "registered": [a.name for _, a in registered_adapters()]}
marsm_dist.MARSM([torch.nn.Parameter(torch.zeros(4, 4))])  # the first lookups
out["after_lookup"] = [(p, a.name) for p, a in registered_adapters()]
out["frameworks_after"] = [m for m in ("deepspeed", "megatron", "transformers") if m in sys.modules]
if importlib.util.find_spec("deepspeed") is not None:
    from deepspeed.runtime.engine import DeepSpeedEngine
    basic = DeepSpeedEngine._configure_basic_optimizer
    out["engine_patched"] = (hasattr(DeepSpeedEngine, "_marsm_patched") or hasattr(torch.optim, "MARSM")
                             or basic.__module__ != "deepspeed.runtime.engine")
print("PROBE" + json.dumps(out))
"""


@pytest.mark.slow
def test_importing_marsm_dist_imports_no_framework_and_registers_nothing():
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("PROBE", 1)[1])
    assert out["frameworks"] == [] and not out["adapters_package"] and out["registered"] == []
    # The first lookup loads the FSDP2 adapter only (torch's own), and still no framework.
    assert out["after_lookup"] == [[10, "fsdp2"]] and out["frameworks_after"] == []
    assert out.get("engine_patched", False) is False


def test_adapters_are_asked_by_priority_whatever_the_registration_order(monkeypatch):
    from marsm_dist.sharding import adapter as registry

    class A(registry.ShardingAdapter):
        name = "a"

    class B(registry.ShardingAdapter):
        name = "b"

    class C(registry.ShardingAdapter):
        name = "c"

    orders = []
    for first in ([(A(), 20), (B(), 30), (C(), 20)], [(C(), 20), (A(), 20), (B(), 30)]):
        monkeypatch.setattr(registry, "_ADAPTERS", [])
        for adapter, priority in first:
            registry.register_adapter(adapter, priority=priority)
        registry.register_adapter(A(), priority=99)  # a second of one type: ignored
        orders.append([(p, a.name) for p, a in registry.registered_adapters()])
    assert orders[0] == orders[1] == [(30, "b"), (20, "a"), (20, "c")]


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} imports")
    print("circles:", cycles(graph) or "none")
    print("upward imports:", upward_imports(graph) or "none")
