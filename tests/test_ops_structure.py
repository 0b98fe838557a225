"""The import structure of dsv3_jax/ops (DESIGN.md: kernels never import their dispatchers).

Read with `ast`, without importing anything: every import of a dsv3_jax.ops module by a file under
dsv3_jax/ops, at module level or inside a function, in any form (`import dsv3_jax.ops.fp8`,
`from dsv3_jax.ops import fp8`, `from dsv3_jax.ops.fp8 import act_quant`, relative imports,
`importlib.import_module("dsv3_jax.ops.fp8")`).
  (a) the graph has no cycle;
  (b) a module under ops/pallas/ imports nothing of dsv3_jax outside ops/pallas/;
  (c) a kernel under ops/pallas/ imports no other kernel, only the shared module (hopper.py).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

OPS = pathlib.Path(__file__).resolve().parent.parent / "dsv3_jax" / "ops"
PALLAS = "dsv3_jax.ops.pallas"
SHARED = {f"{PALLAS}.hopper"}  # the kernels' shared parts


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The dsv3_jax modules one import statement names (a `from m import x` names m.x when that is
    a module, else m)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name.startswith("dsv3_jax")}
    if (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module",
                                                                 "__import__")
            and node.args and isinstance(node.args[0], ast.Constant)
            and str(node.args[0].value).startswith("dsv3_jax")):
        return {node.args[0].value}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    if not base.startswith("dsv3_jax"):
        return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}


def import_graph(ops_dir: pathlib.Path = OPS) -> dict[str, set[str]]:
    """module -> the dsv3_jax modules it imports, for every .py under `ops_dir` (.../dsv3_jax/ops)."""
    root = ops_dir.parent.parent
    files = sorted(ops_dir.rglob("*.py"))
    known = {_module_name(p, root) for p in files}
    graph = {}
    for path in files:
        name = _module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        deps = set()
        for node in ast.walk(tree):
            deps |= _imported(node, name, path.name == "__init__.py", known)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # "open" on the current path, "done" when fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _ops_only(graph):
    """The graph restricted to edges between dsv3_jax.ops modules (a package import such as
    `dsv3_jax.ops.pallas` is an edge to its __init__)."""
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def outside_pallas(graph) -> dict[str, list[str]]:
    """Rule (b): each ops/pallas module's imports of dsv3_jax outside ops/pallas."""
    bad = {m: sorted(d for d in deps if not (d == PALLAS or d.startswith(PALLAS + ".")))
           for m, deps in graph.items() if m.startswith(PALLAS)}
    return {m: d for m, d in bad.items() if d}


def kernel_to_kernel(graph) -> dict[str, list[str]]:
    """Rule (c): each kernel's imports of other kernels (or of the pallas package)."""
    kernels = {m for m in graph if m.startswith(PALLAS + ".") and m not in SHARED}
    bad = {m: sorted(graph[m] & (kernels | {PALLAS})) for m in kernels}
    return {m: d for m, d in bad.items() if d}


def test_find_cycle_reports_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_every_form_of_import(tmp_path):
    pkg = tmp_path / "dsv3_jax" / "ops"
    (pkg / "pallas").mkdir(parents=True)
    for name in ("__init__.py", "pallas/__init__.py", "pallas/hopper.py"):
        (pkg / name).write_text("")
    (pkg / "fp8.py").write_text("def f():\n    from dsv3_jax.ops.pallas import kernel_a\n")
    (pkg / "pallas" / "kernel_a.py").write_text("from . import hopper\nimport dsv3_jax.ops.fp8\n")
    (pkg / "pallas" / "kernel_b.py").write_text("from .kernel_a import x\nfrom ..fp8 import y\n")
    (pkg / "pallas" / "kernel_c.py").write_text(
        "import importlib\nattention = importlib.import_module('dsv3_jax.ops.attention')\n")
    graph = _ops_only(import_graph(pkg))
    assert graph["dsv3_jax.ops.fp8"] == {f"{PALLAS}.kernel_a"}
    assert graph[f"{PALLAS}.kernel_a"] == {f"{PALLAS}.hopper", "dsv3_jax.ops.fp8"}
    assert graph[f"{PALLAS}.kernel_b"] == {f"{PALLAS}.kernel_a", "dsv3_jax.ops.fp8"}
    assert find_cycle(graph) == ["dsv3_jax.ops.fp8", f"{PALLAS}.kernel_a", "dsv3_jax.ops.fp8"]
    full = import_graph(pkg)  # the rules see imports of modules outside the scanned files too
    assert outside_pallas(full) == {f"{PALLAS}.kernel_a": ["dsv3_jax.ops.fp8"],
                                    f"{PALLAS}.kernel_b": ["dsv3_jax.ops.fp8"],
                                    f"{PALLAS}.kernel_c": ["dsv3_jax.ops.attention"]}
    assert kernel_to_kernel(full) == {f"{PALLAS}.kernel_b": [f"{PALLAS}.kernel_a"]}


@pytest.fixture(scope="module")
def graph():
    g = import_graph()
    assert {"dsv3_jax.ops.fp8", f"{PALLAS}.fp8_gemm_sm90", *SHARED} <= set(g)
    return g


def test_ops_import_graph_has_no_cycle(graph):
    cycle = find_cycle(_ops_only(graph))
    assert cycle is None, "import cycle in dsv3_jax/ops: " + " -> ".join(cycle)


def test_kernels_import_nothing_outside_ops_pallas(graph):
    bad = outside_pallas(graph)
    assert not bad, f"ops/pallas imports outside it: {bad}"


def test_kernels_import_only_the_shared_module(graph):
    bad = kernel_to_kernel(graph)
    assert not bad, f"kernels importing kernels: {bad}"
    assert all(not graph[m] for m in SHARED), "the shared module imports dsv3_jax"
