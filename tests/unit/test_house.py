"""The shape of the code base, read from the source with `ast` (nothing is imported, so this is fast).

- No import circle among the modules of engine/, models/ and kernels/. Imports inside functions
  count too: they hide a dependency, they do not remove it. An edge goes to the most specific module
  an import names (``from engine.pipeline import stages`` -> engine.pipeline.stages), not to every
  parent package on the way. Imports under ``if TYPE_CHECKING:`` never run and are left out.
- Scripts import no test code: a product script that reaches into tests/ breaks when tests move or
  are left out of a deployment.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "models", "kernels")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imported_names(source: str, package: str) -> set[str]:
    """Every dotted name ``source`` imports, anywhere in it; ``from a import b`` gives both ``a`` and
    ``a.b`` (b may be a module or a name in a). Relative imports are resolved against ``package``."""
    tree = ast.parse(source)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for stmt in node.body for n in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def names_in(path: Path) -> set[str]:
    mod = module_name(path)
    return imported_names(path.read_text(), mod if path.name == "__init__.py" else mod.rpartition(".")[0])


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (the most specific module each import names)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for name in names_in(path):
            parts = name.split(".")
            # the longest prefix that is a project module: `engine.optim.lr_at` -> engine.optim
            hit = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in files), None)
            if hit is not None and hit != mod:
                targets.add(hit)
        graph[mod] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), each written as
    a closed path ``a -> b -> ... -> a`` through that component."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, comp) for comp in comps]


def _closed_path(graph, comp: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself (breadth first)."""
    start = min(comp)
    previous, frontier = {}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def test_the_cycle_finder_reports_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_and_relative_ones_count():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport engine.mesh\n"
              "from . import stages\nfrom ..optim import lr_at\n"
              "if TYPE_CHECKING:\n    from engine.trainer import Trainer\n"
              "def f():\n    from engine.checkpoint import save\n")
    names = imported_names(source, "engine.pipeline")
    assert {"engine.mesh", "engine.pipeline.stages", "engine.optim.lr_at", "engine.checkpoint.save"} <= names
    assert not any(n.startswith("engine.trainer") for n in names)


def test_no_import_circle_among_engine_models_kernels():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles (module -> module it imports -> ...):\n" + \
        "\n".join(" -> ".join(c) for c in cycles)


def test_no_script_imports_test_code():
    offenders = {p.name: sorted(n for n in names_in(p) if n == "tests" or n.startswith("tests."))
                 for p in sorted((ROOT / "scripts").glob("*.py"))}
    assert {k: v for k, v in offenders.items() if v} == {}
