"""The layers import only downward (import-linter's contract in pyproject.toml) and no modules import each other
in a cycle, counting imports inside functions too."""

from __future__ import annotations

import grimp

LAYERS = ["cli", "commands", "runner", "recipes", "methods", "engine", "components", "core"]


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m) & modules:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("modrun", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m.startswith("modrun")}
    assert _cycles(graph, modules) == []


def test_layers_import_only_downward() -> None:
    graph = grimp.build_graph("modrun", exclude_type_checking_imports=True)
    upward = []
    for i, layer in enumerate(LAYERS):
        for higher in LAYERS[:i]:
            chain = graph.find_shortest_chain(importer=f"modrun.{layer}", imported=f"modrun.{higher}", as_packages=True)
            if chain:
                upward.append(chain)
    assert upward == []


def test_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for m in ("a", "b", "c"):
        graph.add_module(m)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert _cycles(graph, {"a", "b", "c"}) == [["a", "b"]]


def test_imports_inside_functions_say_why():
    """An import of modrun or torch inside a function is there to keep torch (or an optional package) out of
    `modrun --help`, `modrun list` and validation; the module says so once, or the import line does."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "modrun"
    silent = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        if "# imports inside functions here defer" in text:
            continue
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if not any(n.split(".")[0] in ("modrun", "torch") for n in names):
                    continue
                said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not said:
                    silent.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not silent, f"imports inside functions without a reason: {silent}"
