"""The layers hold: discord.py is imported only by `cogs/` and the Discord layer of `bot/`.

Read statically with `ast` (no module is imported), so an import inside a function counts too.
Memory, prompt, personas, policy, settings and the engine must stay usable from the console, the
tests and `training/` without discord.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The Discord layer inside `bot/`: the bot class, reply rendering, webhooks, command checks,
#: attachments, swipe buttons.
DISCORD_LAYER = {
    "bot/app.py",
    "bot/replies.py",
    "bot/webhooks.py",
    "bot/checks.py",
    "bot/attachments.py",
    "bot/swipes.py",
}


def imported_roots(path: Path) -> set[str]:
    """The top-level package of every module `path` imports (absolute imports)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_only_the_discord_layer_and_cogs_import_discord() -> None:
    importers = {
        path.relative_to(ROOT).as_posix()
        for folder in ("bot", "training")
        for path in modules(folder)
        if "discord" in imported_roots(path)
    }
    assert importers <= DISCORD_LAYER, sorted(importers - DISCORD_LAYER)
    # the layer itself is real: the bot class and the reply path do use discord.py
    assert {"bot/app.py", "bot/replies.py"} <= importers


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom discord.ext import commands\n"
        "def f():\n    import discord.ui\n    from . import sibling\n",
        encoding="utf-8",
    )
    assert imported_roots(sample) == {"os", "discord"}
    assert modules("bot") and modules("training") and modules("cogs")
