"""Notes, summaries and member cards: what the prompt holds besides the turns.

- `NoteStore`: a channel's pinned notes (`/note add`), kept in the order they were added and
  always in the prompt (within `NOTES_TOKENS`).
- `SummaryStore`: a channel's rolling summary of the turns that scrolled out of the window,
  with the range of turn ids it covers (`bot.summaries` writes it in the background).
- `MemberCards`: how a member wants the bot to see them (`/me describe`), one short card per
  member and server (per DM channel outside a server).

Texts are stored as written; `bot.prompt` defuses them when a prompt is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from bot.store.db import Store

#: The longest note or member card, in characters: "one short card" (the commands derive their
#: limits and messages from these).
NOTE_MAX_CHARS = 300
CARD_MAX_CHARS = 300
#: Most notes one channel may hold.
NOTES_MAX = 25


@dataclass(slots=True)
class Note:
    id: int
    channel_id: int
    author_id: int | None
    text: str
    created_at: float


@dataclass(slots=True)
class Summary:
    channel_id: int
    text: str
    first_id: int  # the oldest turn it covers
    last_id: int  # the newest turn it covers: turns after it are not summarised yet
    updated_at: float


class NoteStore(Store):
    """A channel's notes, oldest first; `/note remove N` counts in that order from 1."""

    async def add(
        self, channel_id: int, text: str, *, guild_id: int | None, author_id: int | None
    ) -> int:
        """Store a note; returns its position in `/note list` (1-based)."""
        await self.db.run(
            [
                (
                    "INSERT INTO notes (channel_id, guild_id, author_id, text, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (channel_id, guild_id, author_id, text, time.time()),
                )
            ]
        )
        return len(await self.list(channel_id))

    async def list(self, channel_id: int) -> list[Note]:
        rows = await self.db.all(
            "SELECT id, channel_id, author_id, text, created_at FROM notes "
            "WHERE channel_id = ? ORDER BY id",
            (channel_id,),
        )
        return [Note(*row) for row in rows]

    async def remove(self, channel_id: int, position: int) -> Note | None:
        """Delete the `position`th note (1-based, as listed); None when there is no such note."""
        notes = await self.list(channel_id)
        if not 1 <= position <= len(notes):
            return None
        note = notes[position - 1]
        await self.db.run([("DELETE FROM notes WHERE id = ?", (note.id,))])
        return note


class SummaryStore(Store):
    """One rolling summary per channel."""

    async def get(self, channel_id: int) -> Summary | None:
        row = await self.db.one(
            "SELECT channel_id, text, first_id, last_id, updated_at FROM summaries "
            "WHERE channel_id = ?",
            (channel_id,),
        )
        return Summary(*row) if row else None

    async def put(self, channel_id: int, text: str, first_id: int, last_id: int) -> None:
        """Write (or replace) the channel's summary and the turns it covers."""
        await self.db.run(
            [
                (
                    "INSERT INTO summaries (channel_id, text, first_id, last_id, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (channel_id) DO UPDATE SET "
                    "text = excluded.text, first_id = excluded.first_id, "
                    "last_id = excluded.last_id, updated_at = excluded.updated_at",
                    (channel_id, text, first_id, last_id, time.time()),
                )
            ]
        )

    async def clear(self, channel_id: int) -> bool:
        return await self.db.changed(
            [("DELETE FROM summaries WHERE channel_id = ?", (channel_id,))]
        )


class MemberCards(Store):
    """`/me describe`: one card per member and place (a server, or a DM channel)."""

    async def set(self, place_id: int, user_id: int, text: str) -> None:
        await self.db.run(
            [
                (
                    "INSERT INTO member_cards (place_id, user_id, text, updated_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (place_id, user_id) DO UPDATE SET "
                    "text = excluded.text, updated_at = excluded.updated_at",
                    (place_id, user_id, text, time.time()),
                )
            ]
        )

    async def clear(self, place_id: int, user_id: int) -> bool:
        return await self.db.changed(
            [
                (
                    "DELETE FROM member_cards WHERE place_id = ? AND user_id = ?",
                    (place_id, user_id),
                )
            ]
        )

    async def get(self, place_id: int, user_id: int) -> str | None:
        row = await self.db.one(
            "SELECT text FROM member_cards WHERE place_id = ? AND user_id = ?",
            (place_id, user_id),
        )
        return row[0] if row else None

    async def of(self, place_id: int, user_ids: list[int]) -> dict[int, str]:
        """The cards of `user_ids` in a place (members without one are left out)."""
        if not user_ids:
            return {}
        marks = ",".join("?" * len(user_ids))
        rows = await self.db.all(
            f"SELECT user_id, text FROM member_cards WHERE place_id = ? AND user_id IN ({marks})",
            (place_id, *user_ids),
        )
        return {row[0]: row[1] for row in rows}
