"""The package map of docs/architecture.md, checked: which way imports go, the torch-free base layer, no cycles.

Imports are read from the source: every `import` and `from ... import` anywhere in a module (inside functions
and `if TYPE_CHECKING:` blocks too), so a lazy import that breaks a rule or closes a cycle is caught as well
as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cmath_runtime.base import BASE_MODULES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmath_runtime", "cmath_export", "cmath_train", "cmath_serve", "cmath_demo", "cmath_bench")
BASE = {f"cmath_runtime.{m}" for m in BASE_MODULES} | {"cmath_runtime"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports anywhere in its source (relative imports resolved;
    `from pkg import name` names `pkg.name`, which `_resolve` maps to the module really imported)."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out |= {f"{mod}.{a.name}" for a in node.names}
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


def _imports_nothing_beyond_the_runtime(package: str) -> None:
    """No module of `package` imports training, export, serving, the benchmarks or torch."""
    bad = {}
    for path in _files(package):
        hits = sorted(
            m
            for m in _imports(path)
            if m.split(".")[0] in ("cmath_train", "cmath_export", "cmath_serve", "cmath_bench", "torch")
        )
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_runtime_imports_nothing_from_train_export_or_torch() -> None:
    _imports_nothing_beyond_the_runtime("cmath_runtime")


def test_base_layer_imports_only_itself() -> None:
    bad, own = {}, _own_modules()
    for module in BASE_MODULES:
        path = ROOT / "cmath_runtime" / f"{module}.py"
        hits = sorted(
            r
            for r in (_resolve(m, own) for m in _imports(path))
            if r.split(".")[0] in PACKAGES and r not in BASE
        )
        if hits:
            bad[module] = hits
    assert not bad, bad


def test_training_imports_only_the_base_layer_of_the_runtime() -> None:
    bad, own = {}, _own_modules()
    for path in _files("cmath_train"):
        hits = sorted(
            r
            for r in (_resolve(m, own) for m in _imports(path))
            if r.startswith("cmath_runtime") and r not in BASE
        )
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def test_one_session_loader() -> None:
    """onnxruntime.InferenceSession is created in one place: cmath_runtime/session.py (open_session)."""
    where = sorted(
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in _files(pkg)
        if "InferenceSession(" in p.read_text()
    )
    assert where == ["cmath_runtime/session.py"], where


def _module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (at any depth of its source)."""
    own = _own_modules()
    graph = {}
    for path in (p for pkg in PACKAGES for p in _files(pkg)):
        name = _module_name(path)
        graph[name] = {m for m in (_resolve(i, own) for i in _imports(path)) if m in own and m != name}
    return graph


def test_no_import_cycles() -> None:
    """No module of the six packages reaches itself through imports, counting those inside functions: each
    strongly connected group of modules is reported with one cycle through it."""
    graph = _module_graph()
    cycles = [" -> ".join(_cycle_in(graph, group)) for group in _strongly_connected(graph) if len(group) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_imports_inside_functions() -> None:
    """The graph the cycle check reads has the edges that only a function body makes."""
    graph = _module_graph()
    assert "cmath_runtime.openvino_backend" in graph["cmath_runtime.session"]  # imported in a function only
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]
    assert _cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_training_imports_nothing_from_export_serve_or_benchmarks() -> None:
    """Training is the bottom of the stack after the runtime's base layer: it never imports the exporter, the
    server or the benchmarks (they import it)."""
    bad = {}
    for path in _files("cmath_train"):
        hits = sorted(
            m for m in _imports(path) if m.split(".")[0] in ("cmath_export", "cmath_serve", "cmath_bench")
        )
        if hits:
            bad[_module_name(path)] = hits
    assert not bad, bad


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in order of their first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _cycle_in(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected group (breadth-first: a shortest one)."""
    start, members = group[0], set(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for dep in sorted(graph[node] & members):
                if dep == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if dep not in parents:
                    parents[dep] = node
                    nxt.append(dep)
        frontier = nxt
    raise AssertionError(f"{group} is not strongly connected")


def _foreign_private_uses(path: Path) -> list[str]:
    """`obj._name` in `path` where obj is not self/cls and no class of this module sets `self._name` or defines
    `_name`: a module reaching into another object's private state."""
    tree = ast.parse(path.read_text(), str(path))
    own = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and isinstance(node.ctx, ast.Store)
    }
    own |= {
        f.name
        for c in ast.walk(tree)
        if isinstance(c, ast.ClassDef)
        for f in c.body
        if isinstance(f, ast.FunctionDef)
    }
    return sorted(
        f"{ast.unparse(node)} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        and node.attr not in own
    )


def test_modules_keep_to_their_own_state() -> None:
    """A module reads and writes private state only of the objects its own classes define (e.g. a conversation
    makes every change to its state; the step path computes and hands results back)."""
    bad = {
        _module_name(p): hits for pkg in PACKAGES for p in _files(pkg) if (hits := _foreign_private_uses(p))
    }
    assert not bad, bad


def test_studies_are_not_installed_and_no_installed_package_imports_them() -> None:
    """studies/ (research drivers that train models) runs from a checkout only: pyproject's package list holds
    exactly the installed packages, and none of them imports a study."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(p.rstrip("*") for p in include["include"]) == sorted(PACKAGES)
    assert (ROOT / "studies" / "__init__.py").is_file()
    for path in (p for pkg in PACKAGES for p in _files(pkg)):
        studies = sorted(m for m in _imports(path) if m.split(".")[0] == "studies")
        assert not studies, f"{_module_name(path)} imports {studies}"


def test_the_demo_imports_only_the_runtime() -> None:
    """cmath_demo is a client of the runtime, like an agent: no torch, nothing of training, export or serving."""
    _imports_nothing_beyond_the_runtime("cmath_demo")
