"""The folder layout is the architecture (docs/architecture.md): the layer contract in
pyproject.toml holds, and no import cycle exists anywhere in the package (function-local
imports counted: grimp reads every import statement)."""

from pathlib import Path

import grimp
import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def cycles(graph: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected sets of more than one module (Tarjan), a package's own
    submodules aside (a package's __init__ re-exporting them is not a cycle)."""
    edges = {
        m: {t for t in graph.find_modules_directly_imported_by(m) if not t.startswith(m + ".")}
        for m in graph.modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while True:
                w = stack.pop()
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(part)

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def test_layer_contract_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_import_cycles() -> None:
    assert cycles(grimp.build_graph("spdkit")) == []


def test_cycle_finder_sees_a_cycle() -> None:
    """The check above can fail: a two-module cycle through a function-local import."""

    class Graph:
        modules = {"p.a", "p.b", "p.c"}

        @staticmethod
        def find_modules_directly_imported_by(m: str) -> set[str]:
            return {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}[m]

    assert cycles(Graph()) == [{"p.a", "p.b"}]  # type: ignore[arg-type]
