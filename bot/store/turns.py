"""Turns: every message the bot saw or wrote, per channel, and the full-text recall over them.

A turn is one speaker's message; a reply split over several Discord messages is one turn, and
each of its message ids maps to it, so an edit or a deletion of any chunk reaches the whole turn.
Forgetting (`/admin memory forget`, `/reset`) only moves a channel's watermark: turns at or below
it are hidden from prompts, recall and stats, never deleted (`/admin memory clear` deletes).
One turn can be left out the same way: a `hidden` turn ("Hide from the bot", an
out-of-character line) stays stored but is never read for a prompt, recall or the export.
A `stopped` reply is one a member stopped half-way with its ⏹ button.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bot.prompt import Turn
from bot.store.db import Statement, Store

#: Rows read per page when walking a channel's history newest first.
PAGE = 128
#: Most (member, name) pairs `TurnStore.speakers` reads for one place.
SPEAKERS_LIMIT = 5000


@dataclass(slots=True)
class StoredTurn:
    id: int
    channel_id: int
    guild_id: int | None
    message_id: int | None
    author_id: int | None
    name: str
    role: str
    persona: str | None
    content: str
    tokens: int | None
    created_at: float
    #: left out of prompts, recall and the training export, but kept
    hidden: bool = False
    #: a reply a member stopped while it was being written (what was shown is stored)
    stopped: bool = False

    def __post_init__(self) -> None:
        self.hidden, self.stopped = bool(self.hidden), bool(self.stopped)

    def to_turn(self) -> Turn:
        return Turn(
            self.role,
            self.content,
            self.name,
            self.tokens,
            self.id,
            self.created_at,
            self.author_id if self.role == "user" else None,
        )


#: The columns of `StoredTurn`, in its field order.
TURN_COLUMNS = (
    "id, channel_id, guild_id, message_id, author_id, name, role, persona, content, tokens, "
    "created_at, hidden, stopped"
)


def prefixed_columns(alias: str) -> str:
    """`TURN_COLUMNS` of the table aliased `alias` (for joins)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in TURN_COLUMNS.split(","))


@dataclass(slots=True)
class ChannelStats:
    turns: int
    tokens: int
    oldest: float | None
    newest: float | None


class TurnStore(Store):
    """Store, read, edit and forget a channel's turns; search them for recall (FTS5, BM25)."""

    # ---- writing ----------------------------------------------------------------------------

    async def add(
        self,
        channel_id: int,
        role: str,
        content: str,
        *,
        name: str = "",
        guild_id: int | None = None,
        message_id: int | None = None,
        extra_message_ids: Sequence[int] = (),
        author_id: int | None = None,
        persona: str | None = None,
        tokens: int | None = None,
        created_at: float | None = None,
        awaiting: bool = False,
        answers: int | None = None,
        replacing: int | None = None,
        hidden: bool = False,
        stopped: bool = False,
    ) -> int:
        """Store one turn (and every Discord message id it spans) in one transaction.

        `awaiting`: a user turn the bot owes a reply; `answers`: the user turn this reply
        answers, which stops awaiting in the same transaction (see `bot.store.owed`);
        `replacing`: a turn deleted in the same transaction (a regenerated reply); `hidden`
        and `stopped`: the turn's marks (see the module docstring).
        """
        ids = [m for m in (message_id, *extra_message_ids) if m is not None]
        async with self.db.transaction() as conn:
            if replacing is not None:
                await conn.execute("DELETE FROM turns WHERE id = ?", (replacing,))
            if answers is not None:
                await conn.execute("UPDATE turns SET awaiting = 0 WHERE id = ?", (answers,))
                await conn.execute("DELETE FROM reply_posts WHERE turn_id = ?", (answers,))
            cur = await conn.execute(
                "INSERT INTO turns (channel_id, guild_id, message_id, author_id, name, role, "
                "persona, content, tokens, created_at, awaiting, hidden, stopped) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    channel_id,
                    guild_id,
                    message_id,
                    author_id,
                    name,
                    role,
                    persona,
                    content,
                    tokens,
                    created_at or time.time(),
                    int(awaiting),
                    int(hidden),
                    int(stopped),
                ),
            )
            turn_id = int(cur.lastrowid or 0)
            await conn.executemany(
                "INSERT OR REPLACE INTO turn_messages (message_id, turn_id) VALUES (?, ?)",
                [(m, turn_id) for m in ids],
            )
        return turn_id

    async def link_messages(self, turn_id: int, message_ids: Sequence[int]) -> None:
        """Attach further Discord messages (later chunks of a long reply) to a turn."""
        await self.db.run(
            [
                (
                    "INSERT OR REPLACE INTO turn_messages (message_id, turn_id) VALUES (?, ?)",
                    (m, turn_id),
                )
                for m in message_ids
            ]
        )

    async def update(
        self,
        turn_id: int,
        content: str,
        tokens: int | None = None,
        *,
        message_id: int | None = None,
    ) -> None:
        """Replace a turn's text (a reply that grew, an edit); `message_id` links a message too."""
        stmts: list[Statement] = [
            ("UPDATE turns SET content = ?, tokens = ? WHERE id = ?", (content, tokens, turn_id))
        ]
        if message_id is not None:
            stmts.append(
                (
                    "UPDATE turns SET message_id = COALESCE(message_id, ?) WHERE id = ?",
                    (message_id, turn_id),
                )
            )
            stmts.append(
                (
                    "INSERT OR REPLACE INTO turn_messages (message_id, turn_id) VALUES (?, ?)",
                    (message_id, turn_id),
                )
            )
        await self.db.run(stmts)

    async def mark(
        self, turn_id: int, *, hidden: bool | None = None, stopped: bool | None = None
    ) -> bool:
        """Set or clear a turn's `hidden` / `stopped` marks; whether the turn exists."""
        sets = {k: int(v) for k, v in (("hidden", hidden), ("stopped", stopped)) if v is not None}
        if not sets:
            return await self.get(turn_id) is not None
        assign = ", ".join(f"{column} = ?" for column in sets)
        return await self.db.changed(
            [(f"UPDATE turns SET {assign} WHERE id = ?", (*sets.values(), turn_id))]
        )

    async def edit_message(self, message_id: int, content: str, tokens: int | None = None) -> bool:
        """A Discord message was edited: its stored turn follows. Returns whether one existed."""
        turn = await self.for_message(message_id)
        if turn is None:
            return False
        await self.update(turn.id, content, tokens)
        return True

    async def delete_message(self, message_id: int) -> bool:
        """A Discord message was deleted: its turn goes (all chunks of a split reply with it)."""
        row = await self.db.one(
            "SELECT turn_id FROM turn_messages WHERE message_id = ?", (message_id,)
        )
        if row is None:
            return False
        await self.delete(row[0])
        return True

    async def delete(self, turn_id: int) -> None:
        """Delete a turn; its message links and swipes go with it (ON DELETE CASCADE)."""
        await self.db.run([("DELETE FROM turns WHERE id = ?", (turn_id,))])

    async def clear(self, channel_id: int) -> int:
        """Delete every turn of a channel and its forget watermark; how many turns went."""
        (n,) = await self.db.one("SELECT COUNT(*) FROM turns WHERE channel_id = ?", (channel_id,))
        await self.db.run(
            [
                ("DELETE FROM turns WHERE channel_id = ?", (channel_id,)),
                (
                    "UPDATE channels SET forget_before = 0, forget_undo = NULL WHERE channel_id = ?",
                    (channel_id,),
                ),
                # the summary of those turns goes with them
                ("DELETE FROM summaries WHERE channel_id = ?", (channel_id,)),
            ]
        )
        return int(n)

    # ---- reading ----------------------------------------------------------------------------

    async def get(self, turn_id: int) -> StoredTurn | None:
        row = await self.db.one(f"SELECT {TURN_COLUMNS} FROM turns WHERE id = ?", (turn_id,))
        return StoredTurn(*row) if row else None

    async def for_message(self, message_id: int) -> StoredTurn | None:
        """The turn a Discord message belongs to (any chunk of a split reply)."""
        row = await self.db.one(
            f"SELECT {prefixed_columns('t')} FROM turn_messages m JOIN turns t "
            "ON t.id = m.turn_id WHERE m.message_id = ?",
            (message_id,),
        )
        return StoredTurn(*row) if row else None

    async def message_ids(self, turn_id: int) -> list[int]:
        rows = await self.db.all(
            "SELECT message_id FROM turn_messages WHERE turn_id = ? ORDER BY message_id",
            (turn_id,),
        )
        return [r[0] for r in rows]

    async def recent(
        self,
        channel_id: int,
        *,
        limit: int | None = None,
        token_budget: int | None = None,
        include_forgotten: bool = False,
    ) -> list[StoredTurn]:
        """The channel's visible turns newest first: after the forget watermark, not hidden.

        Reads page by page through the (channel_id, id) index and stops as soon as `limit` rows
        or `token_budget` cached tokens are reached, so a long channel costs what the window
        needs, not what the channel holds.
        """
        floor = 0 if include_forgotten else await self.watermark(channel_id)
        out: list[StoredTurn] = []
        tokens = 0
        before = None
        while True:
            page = PAGE if limit is None else min(PAGE, limit - len(out))
            if page <= 0:
                break
            sql = (
                f"SELECT {TURN_COLUMNS} FROM turns WHERE channel_id = ? AND id > ? AND hidden = 0"
                + (" AND id < ?" if before is not None else "")
                + " ORDER BY id DESC LIMIT ?"
            )
            args = (channel_id, floor, *(() if before is None else (before,)), page)
            rows = await self.db.all(sql, args)
            for row in rows:
                turn = StoredTurn(*row)
                out.append(turn)
                tokens += (turn.tokens or len(turn.content) // 3) + 8
            if len(rows) < page or (token_budget is not None and tokens >= token_budget):
                break
            before = out[-1].id
        return out

    async def search(
        self,
        channel_id: int,
        match: str,
        *,
        before_id: int | None = None,
        limit: int = 16,
    ) -> list[tuple[StoredTurn, StoredTurn | None]]:
        """The channel's turns matching an FTS5 `match` expression, best BM25 score first, each
        with the turn just before it (its context; None for the channel's first turn).

        Only turns after the forget watermark, not hidden, and (when given) before `before_id`
        are searched,
        so forgotten turns and the ones already in the prompt are never found. A hit on the
        message text weighs twice one on the speaker's name. Two queries whatever the hit
        count: this runs before every reply in a long channel. Empty when the index is off.
        """
        if not self.db.fts or not match:
            return []
        floor = "COALESCE((SELECT forget_before FROM channels WHERE channel_id = ?1), 0)"
        rows = await self.db.all(
            f"SELECT {prefixed_columns('t')}, (SELECT MAX(p.id) FROM turns p "
            f"WHERE p.channel_id = ?1 AND p.id < t.id AND p.id > {floor} AND p.hidden = 0) "
            "FROM turns_fts JOIN turns t ON t.id = turns_fts.rowid WHERE turns_fts MATCH ?2 "
            f"AND t.channel_id = ?1 AND t.id > {floor} AND t.id < ?3 AND t.hidden = 0 "
            "ORDER BY bm25(turns_fts, 0.5, 1.0) LIMIT ?4",
            (channel_id, match, before_id if before_id is not None else 2**62, limit),
        )
        context_ids = sorted({row[-1] for row in rows if row[-1] is not None})
        context: dict[int, StoredTurn] = {}
        if context_ids:
            marks = ",".join("?" * len(context_ids))
            found = await self.db.all(
                f"SELECT {TURN_COLUMNS} FROM turns WHERE id IN ({marks})", context_ids
            )
            context = {row[0]: StoredTurn(*row) for row in found}
        return [
            (StoredTurn(*row[:-1]), context.get(row[-1]) if row[-1] is not None else None)
            for row in rows
        ]

    async def snippet(self, turn_id: int, match: str, words: int) -> str:
        """FTS5's `snippet()` of a turn's text: the window of about `words` words (at most 64)
        that holds the most of what `match` finds, "…" where text was cut. Empty when the
        index is off or the turn does not match."""
        if not self.db.fts or not match:
            return ""
        row = await self.db.one(
            "SELECT snippet(turns_fts, 1, '', '', '…', ?1) FROM turns_fts "
            "WHERE turns_fts MATCH ?2 AND rowid = ?3",
            (max(1, min(words, 64)), match, turn_id),
        )
        return row[0] if row and row[0] else ""

    async def between(self, channel_id: int, after_id: int, before_id: int) -> list[StoredTurn]:
        """The channel's visible (not hidden) turns with `after_id` < id < `before_id`, oldest
        first (what the rolling summary has not covered yet, `bot.summaries`)."""
        rows = await self.db.all(
            f"SELECT {TURN_COLUMNS} FROM turns WHERE channel_id = ? AND id > ? AND id < ? "
            "AND hidden = 0 ORDER BY id",
            (channel_id, after_id, before_id),
        )
        return [StoredTurn(*row) for row in rows]

    async def span(self, channel_id: int) -> tuple[int, int] | None:
        """The ids of the channel's oldest and newest visible turns (None without any)."""
        floor = await self.watermark(channel_id)
        row = await self.db.one(
            "SELECT MIN(id), MAX(id) FROM turns WHERE channel_id = ? AND id > ?",
            (channel_id, floor),
        )
        return (row[0], row[1]) if row and row[0] is not None else None

    async def history(self, channel_id: int) -> list[StoredTurn]:
        """Every stored turn of a channel, oldest first, forgotten and hidden ones included."""
        rows = await self.db.all(
            f"SELECT {TURN_COLUMNS} FROM turns WHERE channel_id = ? ORDER BY id", (channel_id,)
        )
        return [StoredTurn(*row) for row in rows]

    async def last_assistant(self, channel_id: int) -> StoredTurn | None:
        """The bot's newest visible reply in a channel (what /continue and /regenerate act on)."""
        floor = await self.watermark(channel_id)
        row = await self.db.one(
            f"SELECT {TURN_COLUMNS} FROM turns WHERE channel_id = ? AND id > ? "
            "AND role = 'assistant' AND hidden = 0 ORDER BY id DESC LIMIT 1",
            (channel_id, floor),
        )
        return StoredTurn(*row) if row else None

    async def user_spoke_after(self, channel_id: int, turn_id: int) -> bool:
        """Has a member spoken in the channel since turn `turn_id` (hidden lines aside)?"""
        row = await self.db.one(
            "SELECT 1 FROM turns WHERE channel_id = ? AND id > ? AND role = 'user' "
            "AND hidden = 0 LIMIT 1",
            (channel_id, turn_id),
        )
        return row is not None

    async def speakers(
        self, guild_id: int | None, channel_id: int, limit: int = SPEAKERS_LIMIT
    ) -> list[tuple[int, str]]:
        """(author id, name) of members who spoke in the server (in the channel, for a DM),
        each name as stored with their turns; the most recent `limit` pairs. Read once per
        place by `Conversations`, which then keeps the set in step as members speak."""
        where = "guild_id = ?" if guild_id is not None else "channel_id = ?"
        rows = await self.db.all(
            "SELECT author_id, name FROM turns WHERE role = 'user' AND author_id IS NOT NULL "
            f"AND {where} GROUP BY author_id, name ORDER BY MAX(id) DESC LIMIT ?",
            (guild_id if guild_id is not None else channel_id, limit),
        )
        return [(row[0], row[1]) for row in rows]

    async def stats(self, channel_id: int) -> ChannelStats:
        floor = await self.watermark(channel_id)
        row = await self.db.one(
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0), MIN(created_at), MAX(created_at) "
            "FROM turns WHERE channel_id = ? AND id > ?",
            (channel_id, floor),
        )
        return ChannelStats(*row)

    # ---- forgetting -------------------------------------------------------------------------

    async def watermark(self, channel_id: int) -> int:
        """The id of the newest forgotten turn of a channel (0: nothing forgotten)."""
        row = await self.db.one(
            "SELECT forget_before FROM channels WHERE channel_id = ?", (channel_id,)
        )
        return row[0] if row else 0

    async def forget(self, channel_id: int, guild_id: int | None = None) -> int:
        """Hide everything stored so far from future prompts; no turn is deleted, the
        channel's rolling summary is (`/reset` starts afresh)."""
        (top,) = await self.db.one(
            "SELECT COALESCE(MAX(id), 0) FROM turns WHERE channel_id = ?", (channel_id,)
        )
        await self.db.run(
            [
                (
                    "INSERT INTO channels (channel_id, guild_id) VALUES (?, ?) "
                    "ON CONFLICT (channel_id) DO NOTHING",
                    (channel_id, guild_id),
                ),
                (
                    "UPDATE channels SET forget_undo = forget_before, forget_before = ?, "
                    "updated_at = ? WHERE channel_id = ?",
                    (top, time.time(), channel_id),
                ),
                # a fresh start: the summary of what was said so far goes too (it is rewritten
                # from the turns if they are unforgotten and scroll out again)
                ("DELETE FROM summaries WHERE channel_id = ?", (channel_id,)),
            ]
        )
        return int(top)

    async def unforget(self, channel_id: int) -> bool:
        """Undo the last forget. Returns False when there is nothing to undo."""
        return await self.db.changed(
            [
                (
                    "UPDATE channels SET forget_before = forget_undo, forget_undo = NULL "
                    "WHERE channel_id = ? AND forget_undo IS NOT NULL",
                    (channel_id,),
                ),
            ]
        )
