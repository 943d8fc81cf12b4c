"""`/help`: every command the bot has, read from its command tree, so it can never miss one.

Part of the Discord layer. A new command appears here by being registered, with the
description it was declared with; nothing lists commands by hand. `/admin` is shown whole to
those who may use it (`checks.is_manager`) and as one line to everyone else.
"""

from __future__ import annotations

from collections.abc import Iterator

from discord import app_commands

#: Discord's longest embed description: the help text is cut to it (it stays far shorter).
EMBED_MAX = 4096
#: The groups shown whole only to managers.
MANAGER_GROUPS = ("admin",)


def usage(command: app_commands.Command) -> str:  # type: ignore[type-arg]
    """`/note add text` for a command, optional parameters in brackets."""
    params = [p.name if p.required else f"[{p.name}]" for p in command.parameters]
    return " ".join([f"/{command.qualified_name}", *params])


def _walk(
    item: app_commands.Command | app_commands.Group,  # type: ignore[type-arg]
) -> Iterator[app_commands.Command]:  # type: ignore[type-arg]
    if isinstance(item, app_commands.Group):
        for child in item.commands:
            yield from _walk(child)
    else:
        yield item


def help_lines(tree: app_commands.CommandTree, *, manager: bool) -> list[str]:
    """One line per command, `/name params` and what it does, in alphabetical order of the
    top-level names; message-menu commands (Apps) after them."""
    out: list[str] = []
    commands = tree.get_commands()
    for top in sorted(commands, key=lambda c: c.name):
        if isinstance(top, app_commands.ContextMenu):
            continue
        if top.name in MANAGER_GROUPS and not manager:
            out.append(f"`/{top.name} …` {top.description} (Manage Server)")
            continue
        out += [f"`{usage(cmd)}` {cmd.description}" for cmd in _walk(top)]
    menus = sorted((c for c in commands if isinstance(c, app_commands.ContextMenu)), key=lambda c: c.name)
    out += [f"*{menu.name}* (a message's Apps menu)" for menu in menus]
    return out


def help_text(tree: app_commands.CommandTree, *, manager: bool) -> str:
    return "\n".join(help_lines(tree, manager=manager))[:EMBED_MAX]
