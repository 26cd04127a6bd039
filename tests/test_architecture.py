"""The package map of docs/architecture.md, checked: which way imports go, the torch-free base layer, no cycles.

Imports are read from the source (every `import` statement, inside functions too), so a lazy import that breaks
a rule is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cmath_runtime.base import BASE_MODULES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmath_runtime", "cmath_export", "cmath_train", "cmath_serve", "benchmarks")
BASE = {f"cmath_runtime.{m}" for m in BASE_MODULES} | {"cmath_runtime"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports the module x
    return out


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _own_modules() -> set[str]:
    return {_module_name(p) for pkg in PACKAGES for p in _files(pkg)}


def _resolve(name: str, own: set[str]) -> str:
    """`pkg.mod.name` -> `pkg.mod` (the module a `from pkg.mod import name` really imports)."""
    m = name
    while m and m not in own:
        m = m.rpartition(".")[0]
    return m or name


def test_runtime_imports_nothing_from_train_export_or_torch() -> None:
    bad = {}
    for path in _files("cmath_runtime"):
        hits = sorted(m for m in _imports(path) if m.split(".")[0] in ("cmath_train", "cmath_export", "cmath_serve",
                                                                         "benchmarks", "torch"))
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_base_layer_imports_only_itself() -> None:
    bad, own = {}, _own_modules()
    for module in BASE_MODULES:
        path = ROOT / "cmath_runtime" / f"{module}.py"
        hits = sorted(r for r in (_resolve(m, own) for m in _imports(path)) if r.split(".")[0] in PACKAGES and r not in BASE)
        if hits:
            bad[module] = hits
    assert not bad, bad


def test_training_imports_only_the_base_layer_of_the_runtime() -> None:
    bad, own = {}, _own_modules()
    for path in _files("cmath_train"):
        hits = sorted(r for r in (_resolve(m, own) for m in _imports(path)) if r.startswith("cmath_runtime")
                      and r not in BASE)
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_one_session_loader() -> None:
    """onnxruntime.InferenceSession is created in one place: cmath_runtime/session.py (open_session)."""
    where = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in _files(pkg) if "InferenceSession(" in
                   p.read_text())
    assert where == ["cmath_runtime/session.py"], where


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    """Module-level imports inside each package form no cycle (lazy imports inside functions are allowed)."""
    own = _own_modules()
    graph = {}
    for path in _files(package):
        deps = set()
        for name in _imports(path, top_level_only=True):
            m = _resolve(name, own)
            if m and m.split(".")[0] == package and m != _module_name(path):
                deps.add(m)
        graph[_module_name(path)] = deps
    # A package's __init__ importing its submodules is not a cycle worth reporting (Python handles it).
    graph = {k: {d for d in v if d != package} for k, v in graph.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
