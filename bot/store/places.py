"""Places: a channel's and a server's stored choices (mode, persona, settings, forget watermark,
the server's rules) and who is blocked there.

Only what an admin set is stored; `bot.policy` resolves inheritance (thread → parent channel →
server → defaults) and the access rule from these rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bot.store.db import Store


@dataclass(slots=True)
class ChannelState:
    channel_id: int
    guild_id: int | None = None
    mode: str | None = None  # None: inherit (parent, then default)
    persona: str | None = None
    forget_before: int = 0
    forget_undo: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class GuildState:
    guild_id: int
    settings: dict[str, Any] = field(default_factory=dict)
    default_persona: str | None = None
    imports_allowed: bool = True
    reset_allowed: bool = False
    channel_allowlist: list[int] = field(default_factory=list)


_CHANNEL_FIELDS = {"mode", "persona", "settings"}
_GUILD_FIELDS = {
    "settings",
    "default_persona",
    "imports_allowed",
    "reset_allowed",
    "channel_allowlist",
}
#: Fields stored as JSON text.
_JSON_FIELDS = {"settings", "channel_allowlist"}


def _stored(changes: dict[str, Any]) -> dict[str, Any]:
    """Field values as their columns hold them."""
    return {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in changes.items()}


class PlaceStore(Store):
    """Channel and server rows, and the server's blocked users and roles."""

    async def channel(self, channel_id: int) -> ChannelState:
        row = await self.db.one(
            "SELECT channel_id, guild_id, mode, persona, forget_before, forget_undo, settings "
            "FROM channels WHERE channel_id = ?",
            (channel_id,),
        )
        if row is None:
            return ChannelState(channel_id)
        return ChannelState(*row[:6], settings=json.loads(row[6]))

    async def update_channel(
        self, channel_id: int, guild_id: int | None = None, **changes: Any
    ) -> None:
        """Set mode, persona or settings (a dict, replaced whole) for a channel."""
        if bad := set(changes) - _CHANNEL_FIELDS:
            raise ValueError(f"unknown channel fields: {sorted(bad)}")
        await self.db.upsert(
            "channels", {"channel_id": channel_id, "guild_id": guild_id}, _stored(changes)
        )

    async def guild(self, guild_id: int) -> GuildState:
        row = await self.db.one(
            "SELECT guild_id, settings, default_persona, imports_allowed, reset_allowed, "
            "channel_allowlist FROM guilds WHERE guild_id = ?",
            (guild_id,),
        )
        if row is None:
            return GuildState(guild_id)
        return GuildState(
            row[0], json.loads(row[1]), row[2], bool(row[3]), bool(row[4]), json.loads(row[5])
        )

    async def update_guild(self, guild_id: int, **changes: Any) -> None:
        """Set a server's settings, default persona, import/reset rules or channel allow-list."""
        if bad := set(changes) - _GUILD_FIELDS:
            raise ValueError(f"unknown guild fields: {sorted(bad)}")
        await self.db.upsert("guilds", {"guild_id": guild_id}, _stored(changes))

    # ---- access -----------------------------------------------------------------------------

    async def set_blocked(self, guild_id: int, kind: str, target_id: int, blocked: bool) -> bool:
        """Block or unblock a user or role. Returns whether anything changed."""
        if blocked:
            sql = "INSERT OR IGNORE INTO access (guild_id, kind, target_id) VALUES (?, ?, ?)"
        else:
            sql = "DELETE FROM access WHERE guild_id = ? AND kind = ? AND target_id = ?"
        return await self.db.changed([(sql, (guild_id, kind, target_id))])

    async def blocked(self, guild_id: int) -> tuple[set[int], set[int]]:
        """(blocked user ids, blocked role ids) of a guild."""
        users: set[int] = set()
        roles: set[int] = set()
        rows = await self.db.all(
            "SELECT kind, target_id FROM access WHERE guild_id = ?", (guild_id,)
        )
        for kind, target in rows:
            (users if kind == "user" else roles).add(target)
        return users, roles

    async def blocked_users(self, guild_id: int | None) -> set[int]:
        """The users blocked where `guild_id` is (none outside a server): whose turns recall
        leaves out."""
        return (await self.blocked(guild_id))[0] if guild_id else set()
