"""`Memory`: the bot's SQLite file opened once, with one store per kind of record.

The stores live in `bot.store` (one module each) and share one connection and write lock
(`bot.store.db.Database`); callers use them by name: `memory.turns.add(...)`,
`memory.places.channel(...)`, `memory.owed.mark_answered(...)`. Open with
`await Memory.open(path)`; close with `await memory.close()`. `export_jsonl` writes a
channel's `/admin memory export` file, the format `training/`'s `hermes-memory` source reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiosqlite

from bot.store.audit import AuditLog
from bot.store.db import Database
from bot.store.images import ImageStore
from bot.store.notes import MemberCards, NoteStore, SummaryStore
from bot.store.owed import OwedReplies
from bot.store.personas import PersonaStore, WebhookStore
from bot.store.places import PlaceStore
from bot.store.scenes import SceneStore, SwipeStore
from bot.store.turns import TurnStore


class Memory:
    """The stores of one database file."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.turns = TurnStore(database)
        self.owed = OwedReplies(database)
        self.places = PlaceStore(database)
        self.personas = PersonaStore(database)
        self.webhooks = WebhookStore(database)
        self.scenes = SceneStore(database)
        self.swipes = SwipeStore(database)
        self.audit = AuditLog(database)
        self.images = ImageStore(database)
        self.notes = NoteStore(database)
        self.summaries = SummaryStore(database)
        self.member_cards = MemberCards(database)

    @classmethod
    async def open(cls, path: str | Path) -> Memory:
        """Open (creating or migrating) the file; raises `UnusableDatabaseError` if it cannot."""
        return cls(await Database.open(path))

    async def close(self) -> None:
        await self.database.close()

    @property
    def db(self) -> aiosqlite.Connection:
        """The raw connection (diagnostics: `hermes-bot doctor`, tests reading the file)."""
        return self.database.conn

    @property
    def path(self) -> Path:
        return self.database.path

    @property
    def fts(self) -> bool:
        """Whether recall's full-text index exists (False on SQLite builds without FTS5)."""
        return self.database.fts

    async def export_jsonl(self, channel_id: int) -> tuple[int, bytes]:
        """(turn count, the `/admin memory export` file): one JSON line per stored turn, oldest
        first, forgotten ones included and marked, so `training/`'s `hermes-memory` source can
        leave them out; hidden turns ("Hide from the bot", out-of-character lines) are not in
        it at all, and a reply stopped half-way is marked `stopped`. The one definition of that
        file's format."""
        turns = [t for t in await self.turns.history(channel_id) if not t.hidden]
        floor = await self.turns.watermark(channel_id)
        lines = [
            json.dumps(
                {
                    "id": t.id,
                    "channel_id": t.channel_id,
                    "guild_id": t.guild_id,
                    "forgotten": t.id <= floor,  # hidden by /admin memory forget
                    "message_id": t.message_id,
                    "author_id": t.author_id,
                    "name": t.name,
                    "role": t.role,
                    "persona": t.persona,
                    "content": t.content,
                    "tokens": t.tokens,
                    "created_at": t.created_at,
                    "stopped": t.stopped,
                },
                ensure_ascii=False,
            )
            for t in turns
        ]
        return len(turns), ("\n".join(lines) + ("\n" if lines else "")).encode()
