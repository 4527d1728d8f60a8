"""The layers point one way (README, architecture): the command line → stages → pipeline → nothing of ours.

Read from the source with `ast` (nothing is imported): every project import of every module, at the top of the
module or inside a function, is an edge of the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("pipeline", "stages"):
        for p in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def import_graph() -> dict[str, dict[str, bool]]:
    """module → {imported project module: inside a function?}."""
    mods = _modules()

    def target(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        edges: dict[str, bool] = {}
        is_pkg = path.name == "__init__.py"

        def visit(node, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = name.split(".")
                        parts = parts[:len(parts) - child.level + (1 if is_pkg else 0)]
                        base = ".".join(parts + ([base] if base else []))
                    names = [f"{base}.{a.name}" for a in child.names] or [base]
                for n in names:
                    t = target(n)
                    if t and t != name and not name.startswith(t + "."):  # a package's own parents are no edge
                        edges[t] = edges.get(t, True) and inner
                visit(child, inner)

        visit(ast.parse(path.read_text()), False)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_graph_sees_the_imports():
    g = import_graph()
    assert "pipeline.benchmarks" in g["stages.report"] and "stages.extract" in g["stages.cli"]


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_shared_package_never_imports_the_stages():
    up = sorted((m, t) for m, edges in import_graph().items() if m.startswith("pipeline")
                for t in edges if t.startswith("stages"))
    assert up == []


def test_only_the_command_line_imports_the_stages_it_runs():
    """A stage may use a shared helper of another stage (train validates with infer's predictor); the command
    line and the demo (the whole chain) are the only modules importing several stages."""
    g = import_graph()
    for m, edges in g.items():
        stages = {t for t in edges if t.startswith("stages.") and t not in ("stages.cli", "stages.__main__")}
        if m not in ("stages.cli", "stages.demo"):
            assert len(stages) <= 1, (m, sorted(stages))


def test_storage_and_layout_are_the_bottom_layer():
    g = import_graph()
    assert g["pipeline.storage"] == {}  # the very bottom: imports nothing of the project
    assert set(g["pipeline.layout"]) <= {"pipeline.storage"}  # names locations through it
