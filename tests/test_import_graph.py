"""No import circles in product code: a static walk (ast) of every import in bot/, cogs/, training/.

An import inside a function counts too: it still ties the two modules together. Imports under
`if TYPE_CHECKING:` are left out (they never run), and so is the implicit run of a module's own
parent packages (`bot.engine.local` importing `bot.engine.base` does not "import" `bot.engine`). A failure names the circle, e.g.
`bot.engine.local -> bot.engine.batching -> bot.engine.local`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "cogs", "training")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[module_name(path)] = path
    return found


def is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imported(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The product modules `name` imports (a package import counts as its `__init__`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}

    def add(target: str) -> None:
        # `import a.b.c` runs a, a.b and a.b.c: each one is an edge, except the packages that
        # hold the importer itself (Python runs those before the importer, whatever it imports;
        # naming one explicitly, `from bot.engine import X` inside bot.engine.*, still counts)
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in known or prefix == name:
                continue
            if prefix in ancestors and i < len(parts):
                continue
            out.add(prefix)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            add(mod)
            for alias in node.names:  # `from pkg import module`
                add(f"{mod}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, name, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return [circle(edges, comp) for comp in comps]


def circle(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A concrete path start -> ... -> start inside one component, for the failure message."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return [*comp, start]


def test_the_walk_sees_real_imports():
    edges = graph()
    assert "bot.engine.base" in edges["bot.engine.local"]
    assert "bot.engine" in edges["bot.conversation"]
    assert edges["bot.engine.base"] == set()  # the interface imports nothing of the engine


def test_a_submodule_naming_its_own_package_is_an_edge():
    edges = graph()
    assert "bot.engine" not in edges["bot.engine.local"]  # only `bot.engine.base` etc.
    assert "bot.engine.local" in edges["bot.engine"]  # the package re-exports LocalEngine


def test_the_check_finds_a_circle():
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert found == [["a", "b", "c", "a"]]


def test_no_import_circles_in_product_code():
    bad = cycles(graph())
    assert not bad, "import circles: " + "; ".join(" -> ".join(c) for c in bad)


def test_export_and_train_import_one_way():
    # issue 10 broke this circle: the trainer may use the exporter, never the reverse
    edges = graph()
    assert "training.export" in edges["training.train"]
    assert "training.train" not in edges["training.export"]
