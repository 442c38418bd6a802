"""No import cycle in ``engine/`` or ``processors/``, between modules or between packages.

Read from the source with :mod:`ast`, nothing is imported: every ``import``
counts, at the top, inside a function or under ``if TYPE_CHECKING:`` (a
cycle hidden in a function today is a partially initialised module the day
someone moves the import up). Relative imports are resolved; ``from pkg
import name`` where ``name`` is a submodule imports that submodule; importing
``a.b.c`` also imports ``a`` and ``a.b``, whose ``__init__`` runs first.

One exception follows from how Python imports: a module's own ancestor
packages are in ``sys.modules`` before its first line runs, so the implicit
``engine`` in ``engine.glm.client``'s ``import engine.contracts.errors`` runs
no ``__init__`` and is no edge. An explicit ``from engine import X`` there
still is one (it reads a possibly half-initialised package).

Packages are the subpackages of ``engine`` (``engine.runtime``,
``engine.observe``...), the root ``engine`` itself (its ``__init__``), and
``processors``.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("engine", "processors")

Graph = dict[str, set[str]]


def discover(root: Path, top_level: Iterable[str]) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under each top-level package."""
    modules: dict[str, Path] = {}
    for top in top_level:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: Mapping[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_names(name: str, tree: ast.AST, modules: Mapping[str, Path]) -> set[str]:
    """Every module of ``modules`` that running module ``name`` may import."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    named: set[str] = set()  # modules whose attributes the import reads
    implied: set[str] = set()  # modules it only needs in sys.modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, node.module] if node.module else parts)
            else:
                base = node.module or ""
            subs = {f"{base}.{alias.name}" for alias in node.names}
            named.update(subs & modules.keys())
            # ``from pkg import sub`` falls back to importing the submodule;
            # any other name is read from ``pkg`` itself.
            (implied if subs <= modules.keys() else named).add(base)
    implicit = set(implied)
    for target in named | implied:
        implicit.update(_ancestors(target))
    # An ancestor of ``name`` is in sys.modules before ``name`` runs: its __init__ does not run again.
    edges = named | (implicit - set(_ancestors(name)))
    return {t for t in edges if t in modules and t != name}


def module_graph(root: Path = ROOT, top_level: Iterable[str] = TOP_LEVEL) -> Graph:
    modules = discover(root, top_level)
    return {
        name: imported_names(name, ast.parse(path.read_text(encoding="utf-8"), str(path)), modules)
        for name, path in modules.items()
    }


def package_of(module: str, top_level: Iterable[str] = TOP_LEVEL) -> str:
    """``engine.runtime.engine`` -> ``engine.runtime``; ``engine`` -> ``engine``;
    ``processors.image`` -> ``processors``. The first top level is the one cut by subpackage."""
    parts = module.split(".")
    if parts[0] == next(iter(top_level)):
        return ".".join(parts[:2])
    return parts[0]


def package_graph(modules: Graph, top_level: Iterable[str] = TOP_LEVEL) -> Graph:
    tops = tuple(top_level)
    graph: Graph = {}
    for module, targets in modules.items():
        source = package_of(module, tops)
        graph.setdefault(source, set())
        for target in targets:
            if (dest := package_of(target, tops)) != source:
                graph[source].add(dest)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's components of more than one node, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    """The shortest ``start -> ... -> start`` inside one component (breadth first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in a component but on no cycle")


def cycles(graph: Graph) -> list[str]:
    """Each cycle as ``a -> b -> a``: per component, the shortest one through
    each of its members (so every module caught in a cycle is named)."""
    chains: list[str] = []
    for component in strongly_connected(graph):
        seen: set[frozenset[tuple[str, str]]] = set()
        for member in component:
            cycle = _shortest_cycle(graph, member, set(component))
            edges = frozenset(pairwise(cycle))
            if edges not in seen:
                seen.add(edges)
                chains.append(" -> ".join(cycle))
    return chains


def _report(kind: str, found: list[str]) -> str:
    return f"{len(found)} import cycle(s) between {kind}:\n  " + "\n  ".join(found)


def test_no_cycle_between_modules() -> None:
    found = cycles(module_graph())
    assert not found, _report("modules", found)


def test_no_cycle_between_packages() -> None:
    found = cycles(package_graph(module_graph()))
    assert not found, _report("packages", found)


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    """A throwaway tree with cycles of each kind the checker must see: through
    a relative import, a function-level import, a ``TYPE_CHECKING`` import, a
    submodule named in ``from pkg import name``, and a parent ``__init__``."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "",
        "pkg/a/one.py": "from .two import X\n",
        "pkg/a/two.py": "def f():\n    from pkg.b import three\n",
        "pkg/b/__init__.py": "from pkg.b.three import Y\n",
        "pkg/b/three.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a.one\nY = 1\n"
        ),
        "pkg/c/__init__.py": "",
        "pkg/c/four.py": "import pkg.d.five\n",
        "pkg/d/__init__.py": "from pkg.c import four\n",
        "pkg/d/five.py": "",
        "plugins/__init__.py": "",
        "plugins/p.py": "import pkg.a.one\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    tops = ("pkg", "plugins")
    modules = module_graph(tmp_path, tops)
    assert cycles(modules) == [
        "pkg.a.one -> pkg.a.two -> pkg.b.three -> pkg.a.one",
        "pkg.b -> pkg.b.three -> pkg.a.one -> pkg.a.two -> pkg.b",
        "pkg.c.four -> pkg.d -> pkg.c.four",
    ]
    assert cycles(package_graph(modules, tops)) == ["pkg.a -> pkg.b -> pkg.a", "pkg.c -> pkg.d -> pkg.c"]
    # The checker names the cycle it fails on.
    assert "pkg.c -> pkg.d -> pkg.c" in _report("packages", cycles(package_graph(modules, tops)))


def test_own_ancestors_are_no_edge_but_a_named_import_of_one_is() -> None:
    modules = {
        "p": Path("p/__init__.py"),
        "p.q": Path("p/q/__init__.py"),
        "p.q.r": Path("p/q/r.py"),
        "p.q.s": Path("p/q/s.py"),
        "p.t": Path("p/t/__init__.py"),
    }
    assert imported_names("p.q.r", ast.parse("import p.q.s\n"), modules) == {"p.q.s"}
    assert imported_names("p.q.r", ast.parse("from .. import t\n"), modules) == {"p.t"}
    assert imported_names("p.q.r", ast.parse("from p import VERSION\n"), modules) == {"p"}
    assert imported_names("p.q.r", ast.parse("from p.t import X\n"), modules) == {"p.t"}
    assert imported_names("p.t", ast.parse("import p.q.r\n"), modules) == {"p.q", "p.q.r"}
