"""Replies owed, and what catch-up reads at start.

A user turn the bot decided to answer is stored owed (`TurnStore.add(awaiting=True)`); the
reply's first message settles it (`mark_answered`, or `TurnStore.add(answers=...)` in the same
transaction as the bot's turn). Whatever is still owed at start was queued when the bot stopped,
and catch-up answers it; `newest_message_id` and `known_channels` tell catch-up where to read
the messages it missed while it was away.
"""

from __future__ import annotations

from bot.store.db import Store
from bot.store.turns import TURN_COLUMNS, StoredTurn


class OwedReplies(Store):
    """Which user turns still wait for the bot's reply; settling one happens exactly once."""

    async def mark_answered(self, turn_id: int) -> bool:
        """The reply to `turn_id` has started to show (or was settled otherwise): it is no
        longer owed. Returns whether it was still awaiting, so only one caller answers it."""
        return await self.db.changed(
            [("UPDATE turns SET awaiting = 0 WHERE id = ? AND awaiting = 1", (turn_id,))]
        )

    async def awaiting(self) -> list[StoredTurn]:
        """Every user turn still owed a reply, in every channel, oldest first."""
        rows = await self.db.all(f"SELECT {TURN_COLUMNS} FROM turns WHERE awaiting = 1 ORDER BY id")
        return [StoredTurn(*row) for row in rows]

    async def is_awaiting(self, turn_id: int) -> bool:
        row = await self.db.one("SELECT awaiting FROM turns WHERE id = ?", (turn_id,))
        return bool(row and row[0])

    async def newest_message_id(self, channel_id: int, *, window: int = 50) -> int | None:
        """The newest Discord message id stored for a channel (among its last `window` turns:
        turns are stored in arrival order, give or take replies still streaming)."""
        row = await self.db.one(
            "SELECT MAX(m.message_id) FROM turn_messages m JOIN ("
            "SELECT id FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?) t "
            "ON m.turn_id = t.id",
            (channel_id, window),
        )
        return row[0] if row and row[0] is not None else None

    async def known_channels(self) -> list[tuple[int, int | None]]:
        """(channel id, guild id) of every channel the bot has stored turns in or has settings
        for, whatever their mode (the caller applies the channel policy).

        Walks the (channel_id, id) index one channel at a time: a seek per channel, not a scan
        of every turn.
        """
        found: dict[int, int | None] = {}
        after = -(1 << 63)
        while True:
            row = await self.db.one(
                "SELECT channel_id, guild_id FROM turns WHERE channel_id > ? "
                "ORDER BY channel_id LIMIT 1",
                (after,),
            )
            if row is None:
                break
            found[row[0]] = row[1]
            after = row[0]
        for channel_id, guild_id in await self.db.all("SELECT channel_id, guild_id FROM channels"):
            if found.get(channel_id) is None:
                found[channel_id] = guild_id
        return sorted(found.items())
