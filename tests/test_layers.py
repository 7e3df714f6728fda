"""The layers hold, as packages: each raydrat module imports only its own layer or lower ones,
in the order schemas → model (and data beside it) → techniques → memory → fit/setup →
adapters, with no circle between packages or modules. The core imports neither Ray nor
MLflow (and imports in an interpreter where they cannot be imported at all), and no raydrat
import hides in a function outside the CLI's lazy subcommands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "raydrat"
CORE = "raydrat.core"

# Leaf modules any layer may import: each imports nothing of raydrat (checked below), so an
# edge to one can close no circle and drag in no layer. They are the shared words of the
# package: the version, the metric names with the logger and throughput counters every layer
# reports through (techniques report their metrics under these names), walking an exception
# chain, masking secrets (data sources name credentials; tracking and tune redact), and
# replacing a file whole (checkpoints, manifests, run records, sweep state).
VOCABULARY = ("raydrat", "raydrat.core.metrics", "raydrat.core.exceptions", "raydrat.redact", "raydrat.atomic")

# Bottom to top: a module may import modules of its own layer or of a lower one. A module
# belongs to the layer of the longest package prefix listed here; anything else is an adapter.
# "raydrat.core" stands for the core's root modules (fit, step, runtime, optim, evaluate, ...).
LAYERS = (
    ("schemas", ("raydrat.config",)),
    ("model", ("raydrat.core.model", "raydrat.core.data")),
    ("techniques", ("raydrat.core.techniques",)),
    ("memory", ("raydrat.core.memory",)),
    ("fit/setup", ("raydrat.core", "raydrat.core.checkpoint")),
)
ADAPTERS = "adapters"
PACKAGES = tuple(pkg for _, pkgs in LAYERS for pkg in pkgs)


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _targets(node: ast.Import | ast.ImportFrom, mod: str, is_package: bool, modules: set[str]) -> list[str]:
    """The raydrat modules one import statement loads: ``from pkg import sub`` is the module
    ``pkg.sub`` when there is one (not ``pkg`` itself), else ``pkg``."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            parts = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = []
    for name in names:
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            found.append(".".join(parts))
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """(raydrat module -> raydrat modules it imports, module -> third-party tops, hidden
    imports ``"mod -> target"`` made inside functions)."""
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(paths)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    tops: dict[str, set[str]] = {m: set() for m in modules}
    hidden: list[str] = []
    for mod, path in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                tops[mod].update(a.name.split(".")[0] for a in node.names)
            elif node.level == 0 and node.module:
                tops[mod].add(node.module.split(".")[0])
            for target in _targets(node, mod, path.name == "__init__.py", modules):
                if target == mod:
                    continue
                edges[mod].add(target)
                if id(node) in inside and mod != "raydrat.cli":  # the CLI imports per command
                    hidden.append(f"{mod} -> {target}")
    return edges, tops, hidden


def package_of(mod: str) -> str:
    """The package a module counts in: the longest listed layer package it is in, else (an
    adapter) its top-level package or module under raydrat."""
    listed = [p for p in PACKAGES if mod == p or mod.startswith(p + ".")]
    if listed:
        return max(listed, key=len)
    return ".".join(mod.split(".")[:2])


def layer_of(mod: str) -> int:
    """0 for the vocabulary, then 1.. for the layers bottom to top; adapters last."""
    if mod in VOCABULARY:
        return 0
    pkg = package_of(mod)
    for i, (_, pkgs) in enumerate(LAYERS, start=1):
        if pkg in pkgs:
            return i
    return len(LAYERS) + 1


def layer_name(i: int) -> str:
    return "vocabulary" if i == 0 else LAYERS[i - 1][0] if i <= len(LAYERS) else ADAPTERS


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, as ``"a -> b (fit/setup imported by techniques)"``."""
    return sorted(
        f"{a} -> {b} ({layer_name(layer_of(b))} imported by {layer_name(layer_of(a))})"
        for a, targets in edges.items()
        for b in targets
        if layer_of(b) > layer_of(a)
    )


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph contracted to packages (vocabulary modules left out: they are leaves)."""
    out: dict[str, set[str]] = {}
    for a, targets in edges.items():
        if a in VOCABULARY:
            continue
        pa = package_of(a)
        out.setdefault(pa, set()).update(package_of(b) for b in targets if b not in VOCABULARY and package_of(b) != pa)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
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


def test_every_module_imports_only_its_layer_or_lower_ones():
    edges, _, _ = import_graph()
    assert layer_violations(edges) == []


def test_no_circle_between_packages():
    edges, _, _ = import_graph()
    assert cycles(package_edges(edges)) == []


def test_the_layer_check_catches_an_upward_import_and_a_package_circle():
    """Not vacuous: a technique importing the training loop, an adapter below the core, and
    two adapters importing each other are all caught."""
    upward = {
        "raydrat.core.techniques.slots": {"raydrat.core.fit", "raydrat.core.metrics"},
        "raydrat.core.data.sources": {"raydrat.tracking", "raydrat.redact"},
        "raydrat.core.memory.peak": {"raydrat.core.techniques.base"},
    }
    assert layer_violations(upward) == [
        "raydrat.core.data.sources -> raydrat.tracking (adapters imported by model)",
        "raydrat.core.techniques.slots -> raydrat.core.fit (fit/setup imported by techniques)",
    ]
    circle = {"raydrat.tune.report": {"raydrat.bench.report"}, "raydrat.bench.model": {"raydrat.tune.space"}}
    assert cycles(package_edges(circle)) == [["raydrat.bench", "raydrat.tune"]]


def test_every_layer_package_exists_and_the_vocabulary_imports_nothing_of_raydrat():
    """A renamed package would make the layer check pass vacuously; a vocabulary module that
    grew a raydrat import would not be a leaf any layer can use."""
    edges, _, _ = import_graph()
    for pkg in PACKAGES:
        assert any(m == pkg or m.startswith(pkg + ".") for m in edges), pkg
    assert {m: edges[m] for m in VOCABULARY} == {m: set() for m in VOCABULARY}


def test_only_the_cli_imports_the_benchmarks():
    """The benchmarks measure the product from above: the sweep, the model commands and the
    rest of the product never depend on them (shared tables are raydrat.tables)."""
    edges, _, _ = import_graph()
    users = {package_of(a) for a, targets in edges.items() for b in targets if package_of(b) == "raydrat.bench"}
    assert users - {"raydrat.bench"} == {"raydrat.cli"}


def test_the_model_package_is_only_the_model():
    """The model and the data pipeline sit side by side: neither imports the other (loading
    a checkpoint, which needs both, is the checkpoint package's job)."""
    edges, _, _ = import_graph()
    crossing = {
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if {package_of(a), package_of(b)} == {"raydrat.core.model", "raydrat.core.data"}
    }
    assert crossing == set()


def test_core_never_imports_ray_or_mlflow():
    _, tops, _ = import_graph()
    offenders = {
        m: sorted(t & {"ray", "mlflow"}) for m, t in tops.items() if m.startswith(CORE) and t & {"ray", "mlflow"}
    }
    assert offenders == {}


def test_schemas_import_only_schemas():
    """The config schemas import each other and the vocabulary (a leaf: the metric names a
    sweep's metric is checked against), nothing else."""
    edges, _, _ = import_graph()
    for mod, targets in edges.items():
        if package_of(mod) == "raydrat.config":
            assert all(package_of(t) == "raydrat.config" or t in VOCABULARY for t in targets), (mod, targets)


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


def test_every_module_imports():
    """Every raydrat module imports, so a name moved between modules (say a shared helper
    moved to raydrat.tables) breaks here and not first in a command that is rarely run, such
    as a benchmark. The import graph above checks which modules are imported, not the names."""
    modules = sorted(module_name(p) for p in PKG.rglob("*.py") if p.name != "__main__.py")
    script = (
        "import importlib\n"
        "failed = []\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{m}: {e!r}')\n"
        "print('\\n'.join(failed))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout[-3000:] + proc.stderr[-3000:]
