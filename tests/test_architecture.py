"""The core package's modules form layers: no import cycle, counting imports inside functions too.

A cycle hidden in a function-level import still ties two modules together (a change to one can break the
other at run time, as the first call imports it); annotations imported under ``if TYPE_CHECKING:`` are
not imports at run time and are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "core"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def core_imports(source: str, modules: set[str]) -> set[str]:
    """Names of the ``core`` modules (among ``modules``) that ``source`` imports anywhere, run-time only."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "core":
                out.update(a.name for a in node.names if a.name in modules)
            elif node.module.startswith("core."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("core."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return out & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_find_cycle_on_known_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_core_imports_reads_function_level_imports_and_skips_type_checking():
    src = ("from typing import TYPE_CHECKING\nfrom core import io as mio, metrics\nimport core.tasks\n"
           "if TYPE_CHECKING:\n    from core.ood import X\n"
           "def f():\n    from core.train import fit\n")
    assert core_imports(src, {"io", "metrics", "tasks", "ood", "train"}) == {"io", "metrics", "tasks", "train"}


def test_core_has_no_import_cycle():
    modules = {p.stem for p in CORE.glob("*.py") if p.stem != "__init__"}
    graph = {m: core_imports((CORE / f"{m}.py").read_text(), modules) - {m} for m in modules}
    assert find_cycle(graph) is None, f"import cycle in core: {' -> '.join(find_cycle(graph))}"
    # the layers the task modules rest on import no task module
    for engine in ("runtime", "train", "ood", "metrics", "io", "preprocess", "explain", "models", "quantize",
                   "checkpoint"):
        assert not graph[engine] & {"pneumonia", "cardiac", "atrium", "inference"}, (engine, graph[engine])
