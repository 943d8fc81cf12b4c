"""The layers hold: discord.py is imported only by `cogs/` and the Discord layer of `bot/`.

Read statically with `ast` (no module is imported), so an import inside a function counts too.
Memory, prompt, personas, policy, settings and the engine must stay usable from the console, the
tests and `training/` without discord.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The Discord layer inside `bot/`: one folder (the bot class, posting, webhooks, command checks,
#: attachments, swipe buttons, catch-up).
DISCORD_LAYER = "bot/discord/"


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
    outside = sorted(path for path in importers if not path.startswith(DISCORD_LAYER))
    assert not outside, outside
    # the layer itself is real: the bot class and the reply path do use discord.py
    assert {"bot/discord/client.py", "bot/discord/posting.py"} <= importers


def test_the_discord_layer_does_not_shadow_discord_py() -> None:
    # `bot.discord` is a package of its own; inside it `import discord` is still discord.py
    import discord

    import bot.discord.posting as posting

    assert posting.discord is discord
    assert hasattr(discord, "Client") and Path(discord.__file__).parent != ROOT / "bot" / "discord"


def test_the_core_does_not_import_the_discord_layer() -> None:
    # the core stays usable without Discord: only the CLI entry point starts the Discord bot
    def imports_layer(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(name == "bot.discord" or name.startswith("bot.discord.") for name in names):
                return True
        return False

    core = [
        path.relative_to(ROOT).as_posix()
        for folder in ("bot", "training")
        for path in modules(folder)
        if not path.relative_to(ROOT).as_posix().startswith(DISCORD_LAYER)
    ]
    importers = sorted(p for p in core if imports_layer(ROOT / p))
    assert importers == ["bot/__main__.py"], importers


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nfrom discord.ext import commands\n"
        "def f():\n    import discord.ui\n    from . import sibling\n",
        encoding="utf-8",
    )
    assert imported_roots(sample) == {"os", "discord"}
    assert modules("bot") and modules("training") and modules("cogs")
