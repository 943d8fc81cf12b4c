"""Replies owed, and what catch-up reads at start.

A user turn the bot decided to answer is stored owed (`TurnStore.add(awaiting=True)`); the
reply's first message settles it (`mark_answered`, or `TurnStore.add(answers=...)` in the same
transaction as the bot's turn). Whatever is still owed at start was queued when the bot stopped,
and catch-up answers it; `newest_message_id` and `known_channels` tell catch-up where to read
the messages it missed while it was away.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.store.db import Store
from bot.store.turns import TURN_COLUMNS, StoredTurn


@dataclass(frozen=True, slots=True)
class ReplyPost:
    """A reply whose posting started while its turn was owed (see `OwedReplies.posting`)."""

    turn_id: int
    persona: str | None
    message_id: int | None  # the reply's first Discord message, once Discord returned it


class OwedReplies(Store):
    """Which user turns still wait for the bot's reply; settling one happens exactly once."""

    async def mark_answered(self, turn_id: int) -> bool:
        """`turn_id` is settled (answered, failed, given up): it is no longer owed. Returns
        whether it was still awaiting, so only one caller settles it. Called by the reply
        runner's handle (`bot.discord.replying.OwedReply`) and by `TurnStore.add(answers=...)`."""
        return await self.db.changed(
            [
                ("UPDATE turns SET awaiting = 0 WHERE id = ? AND awaiting = 1", (turn_id,)),
                ("DELETE FROM reply_posts WHERE turn_id = ?", (turn_id,)),
            ]
        )

    async def posting(self, turn_id: int, persona: str | None) -> None:
        """A reply to owed `turn_id` is about to be sent: written before the first message
        goes out, so a process killed after the post leaves a trace for catch-up."""
        await self.db.run(
            [
                (
                    "INSERT OR IGNORE INTO reply_posts (turn_id, persona) VALUES (?, ?)",
                    (turn_id, persona),
                )
            ]
        )

    async def posted(self, turn_id: int, message_id: int) -> None:
        """Discord returned the reply's first message: its id, kept until the turn settles."""
        await self.db.run(
            [
                (
                    "UPDATE reply_posts SET message_id = ? WHERE turn_id = ? AND message_id IS NULL",
                    (message_id, turn_id),
                )
            ]
        )

    async def posts(self) -> dict[int, ReplyPost]:
        """The replies that started to post to turns still owed, by turn id (a process stopped
        between sending a reply and storing it)."""
        rows = await self.db.all(
            "SELECT p.turn_id, p.persona, p.message_id FROM reply_posts p "
            "JOIN turns t ON t.id = p.turn_id WHERE t.awaiting = 1"
        )
        return {row[0]: ReplyPost(*row) for row in rows}

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

    async def recent_speakers(self, limit: int, *, scan: int = 10_000) -> list[int]:
        """Members who spoke in a server lately (among the newest `scan` turns), newest first,
        at most `limit`, leaving out those who DMed the bot lately too: whose
        DMs catch-up opens to look for messages sent while it was away (a bot cannot list its
        DM channels, and a DM channel it already knows is read with the known channels)."""
        rows = await self.db.all(
            "WITH recent AS (SELECT author_id, guild_id, id FROM turns "
            "WHERE role = 'user' AND author_id IS NOT NULL ORDER BY id DESC LIMIT ?) "
            "SELECT author_id FROM recent WHERE guild_id IS NOT NULL AND author_id NOT IN "
            "(SELECT author_id FROM recent WHERE guild_id IS NULL) "
            "GROUP BY author_id ORDER BY MAX(id) DESC LIMIT ?",
            (scan, limit),
        )
        return [r[0] for r in rows]

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
