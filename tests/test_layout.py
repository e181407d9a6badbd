"""The layout tells the design: no import cycle between rapidserve's modules (counting imports
inside functions too: a lazy import only hides a cycle), and the three topologies side by side
in rapidserve.serving over the front they share, with nothing below `rapidserve.engine`
importing it back."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "rapidserve").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the rapidserve modules it imports, anywhere in its file (TYPE_CHECKING blocks
    excluded: they never run)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(n) for n in ast.walk(node))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in modules:  # `from pkg import name`: the package, or the submodule
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("rapidserve"):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    # Package __init__ re-exports make a package and its modules import each other: that is
    # not a cycle of the design, so packages are left out.
    graph = import_graph()
    packages = {m for m in graph if (SRC / m.replace(".", "/") / "__init__.py").exists()}
    pruned = {m: {t for t in ts if t not in packages} for m, ts in graph.items() if m not in packages}
    assert _cycles(pruned) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_three_topologies_side_by_side():
    graph = import_graph()
    for topology in ("hybrid", "rapid", "disagg"):
        assert f"rapidserve.serving.{topology}" in graph
        assert "rapidserve.serving.front" in graph[f"rapidserve.serving.{topology}"] or topology == "disagg"
    # Only the entry points (and the package's own API) import the engine chooser.
    importers = {m for m, ts in graph.items() if "rapidserve.engine" in ts}
    assert not {m for m in importers if m.startswith(("rapidserve.serving", "rapidserve.runner",
                                                       "rapidserve.scheduler", "rapidserve.model"))}
