"""The package's layers hold, read from the source (every import, lazy ones included):

cli -> pipeline -> (nothing model-specific); stages -> report / merge / math / models / io;
math is tensors only; no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "harc_hpc"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    modules = set(graph)
    return {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = imports()
assert len(GRAPH) > 50 and sum(map(len, GRAPH.values())) > 150  # the scan found the package


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m, chain):
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(chain + [m])
        state[m] = 1
        for d in sorted(GRAPH[m]):
            # a package's __init__ re-exporting its own modules is not a cycle of layers
            if not m.startswith(d + ".") and not d.startswith(m + "."):
                visit(d, chain + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        visit(m, [])


ALLOWED = {
    # layer: the layers it may import (errors, dtypes and config are shared by all)
    "math": {"math"},
    "io": {"io", "math"},
    "models": {"models", "io"},
    "merge": {"merge", "io", "models", "math"},  # math: RegMean's closed form
    "mergeme": {"mergeme", "merge", "io", "models"},
    "pipeline": {"pipeline", "io"},
    # pipeline: run records; mergeme: the MergeME run's report; eval_tasks: lm-eval's local tasks
    "report": {"report", "math", "io", "models", "stages", "demo", "pipeline", "mergeme", "eval_tasks"},
    "stages": {"stages", "math", "io", "models", "merge", "mergeme", "report", "demo", "progress"},
    "demo": {"demo", "io", "models", "eval_tasks"},  # eval_tasks: where the demo's task items are shipped
    "eval_tasks": {"eval_tasks"},
    "cli": {"cli", "pipeline", "report", "stages", "io", "mergeme"},
}
SHARED = {"errors", "dtypes", "config", "progress", "devices", ""}  # devices: which device a process uses


def test_each_layer_imports_only_what_it_may():
    bad = []
    for m, deps in sorted(GRAPH.items()):
        own = layer(m)
        if own not in ALLOWED:
            continue
        for d in sorted(deps):
            if layer(d) not in ALLOWED[own] | SHARED:
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(bad)


def test_math_touches_no_files():
    for path in (PKG / "math").rglob("*.py"):
        text = path.read_text()
        for word in ("h5py", "zarr", "safetensors", "open(", "submitit", "subprocess"):
            assert word not in text, f"{path.name} uses {word}"
