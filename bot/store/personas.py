"""Personas a server imported (Character Card V2 JSON and an avatar), and the webhooks the bot
owns (one per channel, through which personas speak under their own name and picture).

`bot.personas.PersonaLibrary` reads the stored cards next to the shipped ones; `bot.discord.webhooks`
creates, reuses and forgets the webhooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bot.store.db import Store


@dataclass(slots=True)
class StoredPersona:
    id: int
    guild_id: int
    name: str
    card: str  # Character Card V2 JSON
    avatar: bytes | None
    created_by: int
    created_at: float


_PERSONA_COLUMNS = "id, guild_id, name, card, avatar, created_by, created_at"


class PersonaStore(Store):
    """A server's imported personas, by name (case-insensitive, unique per server)."""

    async def save(
        self,
        guild_id: int,
        name: str,
        card_json: str,
        created_by: int,
        avatar: bytes | None = None,
        *,
        replace: bool = False,
    ) -> int:
        """Store a card; with `replace`, an existing one of that name is overwritten (its avatar
        kept when none is given). Without it a taken name raises `sqlite3.IntegrityError`."""
        now = time.time()
        if replace:
            sql = (
                "INSERT INTO personas (guild_id, name, card, avatar, created_by, created_at) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (guild_id, name COLLATE NOCASE) DO UPDATE SET "
                "card = excluded.card, avatar = COALESCE(excluded.avatar, avatar), "
                "updated_at = excluded.created_at"
            )
        else:
            sql = (
                "INSERT INTO personas (guild_id, name, card, avatar, created_by, created_at) "
                "VALUES (?,?,?,?,?,?)"
            )
        (row_id,) = await self.db.run([(sql, (guild_id, name, card_json, avatar, created_by, now))])
        return int(row_id or 0)

    async def get(self, guild_id: int, name: str) -> StoredPersona | None:
        row = await self.db.one(
            f"SELECT {_PERSONA_COLUMNS} FROM personas WHERE guild_id = ? AND name = ? "
            "COLLATE NOCASE",
            (guild_id, name),
        )
        return StoredPersona(*row) if row else None

    async def in_guild(self, guild_id: int) -> list[StoredPersona]:
        """Every persona a server imported, by name."""
        rows = await self.db.all(
            f"SELECT {_PERSONA_COLUMNS} FROM personas WHERE guild_id = ? "
            "ORDER BY name COLLATE NOCASE",
            (guild_id,),
        )
        return [StoredPersona(*row) for row in rows]

    async def delete(self, guild_id: int, name: str) -> bool:
        """Delete a persona; whether there was one of that name."""
        return await self.db.changed(
            [
                (
                    "DELETE FROM personas WHERE guild_id = ? AND name = ? COLLATE NOCASE",
                    (guild_id, name),
                )
            ]
        )


class WebhookStore(Store):
    """The webhook the bot made in each channel (id and token), so it is reused, not remade."""

    async def get(self, channel_id: int) -> tuple[int, str] | None:
        """(webhook id, token) of the channel's webhook, if the bot made one."""
        row = await self.db.one(
            "SELECT webhook_id, token FROM webhooks WHERE channel_id = ?", (channel_id,)
        )
        return (row[0], row[1]) if row else None

    async def save(self, channel_id: int, webhook_id: int, token: str) -> None:
        await self.db.run(
            [("INSERT OR REPLACE INTO webhooks VALUES (?, ?, ?)", (channel_id, webhook_id, token))]
        )

    async def forget(self, channel_id: int) -> None:
        """The webhook is gone (deleted on Discord): the next post makes a new one."""
        await self.db.run([("DELETE FROM webhooks WHERE channel_id = ?", (channel_id,))])

    async def ids(self) -> set[int]:
        """Every webhook id the bot owns (messages from them are the bot's own)."""
        return {r[0] for r in await self.db.all("SELECT webhook_id FROM webhooks")}
