"""The training package imports in one direction: no module imports back into one importing it.

Walks the real import statements (top level and inside functions) of every module in
`training/`, so a lazy `from training.train import ...` inside export.py counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "training").glob("*.py")):
        name = f"training.{path.stem}" if path.stem != "__init__" else "training"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("training.") and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append(path[path.index(dep) :] + [dep])
            elif len(path) < len(graph):
                visit(dep, [*path, dep])

    for start in graph:
        visit(start, [start])
    return found


def test_training_has_no_import_cycles() -> None:
    graph = training_imports()
    assert "training.export" in graph["training.train"]  # the walk sees real edges
    assert cycles(graph) == []


def test_export_does_not_import_the_loop() -> None:
    assert "training.train" not in training_imports()["training.export"]
