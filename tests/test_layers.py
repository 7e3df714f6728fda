"""The three layers hold: raydrat's import graph has no circle, the core imports neither
Ray nor MLflow (and imports in an interpreter where they cannot be imported at all), the
schemas import nothing of raydrat but schemas, and no raydrat import hides in a function
outside the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "raydrat"
SCHEMAS = ("raydrat.config", "raydrat.config.model")
CORE = "raydrat.core"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(raydrat module -> raydrat modules it imports, module -> third-party tops, hidden
    imports ``"mod -> target"`` made inside functions)."""
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    tops: dict[str, set[str]] = {m: set() for m in modules}
    hidden: list[str] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                tops[mod].add(name.split(".")[0])
                if not name.startswith("raydrat"):
                    continue
                parts = name.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                target = ".".join(parts)
                if target and target != mod:
                    edges[mod].add(target)
                    if id(node) in inside and mod != "raydrat.cli":  # the CLI imports per command
                        hidden.append(f"{mod} -> {target}")
    return edges, tops, hidden


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_and_no_hidden_raydrat_import():
    edges, _, hidden = import_graph()
    assert cycles(edges) == []
    assert hidden == []


def test_the_graph_check_finds_a_circle():
    """The cycle finder is not vacuous."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_never_imports_ray_or_mlflow():
    _, tops, _ = import_graph()
    offenders = {
        m: sorted(t & {"ray", "mlflow"}) for m, t in tops.items() if m.startswith(CORE) and t & {"ray", "mlflow"}
    }
    assert offenders == {}


def test_schemas_import_only_schemas():
    edges, _, _ = import_graph()
    for mod, targets in edges.items():
        if mod.startswith(SCHEMAS):
            assert all(t.startswith(SCHEMAS) for t in targets), (mod, targets)


def test_core_imports_where_ray_and_mlflow_are_missing():
    """Every core module imports in an interpreter where ``import ray`` and ``import mlflow``
    fail, as on a machine without them (the GPU machine has neither)."""
    core = sorted(module_name(p) for p in (PKG / "core").rglob("*.py"))
    script = (
        "import importlib, sys\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'mlflow'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Missing())\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        "print(len(sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
