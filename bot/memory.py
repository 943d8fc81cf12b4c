"""Everything the bot remembers, in one SQLite file (aiosqlite, WAL).

Why SQLite: a self-hosted bot wants one file the user can back up, and WAL gives crash safety
(a killed process loses at most the transaction it was in) with readers that never block the
writer. The schema version lives in `PRAGMA user_version`; `MIGRATIONS` are applied in order at
start, each in its own transaction, so an old file is brought forward without losing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from bot.prompt import Turn

# --------------------------------------------------------------------------------------------
# Schema

_V1 = """
CREATE TABLE turns (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id  INTEGER NOT NULL,
    guild_id    INTEGER,
    message_id  INTEGER,
    author_id   INTEGER,
    name        TEXT NOT NULL DEFAULT '',
    role        TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    persona     TEXT,
    content     TEXT NOT NULL,
    tokens      INTEGER,
    created_at  REAL NOT NULL
);
-- newest-first reads of one channel walk this index backwards: never a table scan
CREATE INDEX turns_by_channel ON turns (channel_id, id);
-- a reply split over several Discord messages is one turn, and every message id maps to it
CREATE TABLE turn_messages (
    message_id  INTEGER PRIMARY KEY,
    turn_id     INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE
);
CREATE INDEX turn_messages_by_turn ON turn_messages (turn_id);
CREATE TABLE channels (
    channel_id     INTEGER PRIMARY KEY,
    guild_id       INTEGER,
    mode           TEXT CHECK (mode IN ('off', 'mention', 'always')),
    persona        TEXT,
    forget_before  INTEGER NOT NULL DEFAULT 0,
    forget_undo    INTEGER,
    settings       TEXT NOT NULL DEFAULT '{}',
    updated_at     REAL
);
"""

_V2 = """
CREATE TABLE guilds (
    guild_id         INTEGER PRIMARY KEY,
    settings         TEXT NOT NULL DEFAULT '{}',
    default_persona  TEXT,
    imports_allowed  INTEGER NOT NULL DEFAULT 1,
    reset_allowed    INTEGER NOT NULL DEFAULT 0,
    channel_allowlist TEXT NOT NULL DEFAULT '[]',
    updated_at       REAL
);
CREATE TABLE personas (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id    INTEGER NOT NULL,
    name        TEXT NOT NULL,
    card        TEXT NOT NULL,
    avatar      BLOB,
    created_by  INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL
);
CREATE UNIQUE INDEX personas_by_name ON personas (guild_id, name COLLATE NOCASE);
CREATE TABLE webhooks (
    channel_id  INTEGER PRIMARY KEY,
    webhook_id  INTEGER NOT NULL,
    token       TEXT NOT NULL
);
CREATE TABLE access (
    guild_id   INTEGER NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('user', 'role')),
    target_id  INTEGER NOT NULL,
    PRIMARY KEY (guild_id, kind, target_id)
);
CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    guild_id    INTEGER,
    channel_id  INTEGER,
    user_id     INTEGER NOT NULL,
    action      TEXT NOT NULL,
    old         TEXT,
    new         TEXT,
    created_at  REAL NOT NULL
);
CREATE INDEX audit_by_guild ON audit (guild_id, id);
"""

# v3 is reserved for the recall branch's FTS5 index (`ensure_fts`, branch `recall`), which lands
# in this slot; until it does, the slot is empty so that v4 keeps its number in every file.
_V3_RESERVED = ""

# v4: replies owed. A user turn the bot decided to answer is stored `awaiting = 1`; the reply's
# first message clears it (`mark_answered`, or `add_turn(answers=...)` with the bot's turn). What
# is still awaiting at start was queued when the bot stopped, and is answered then (catch-up).
# Only ADD COLUMN and an index: it applies the same after v3, whatever v3 built.
_V4 = """
ALTER TABLE turns ADD COLUMN awaiting INTEGER NOT NULL DEFAULT 0;
CREATE INDEX turns_awaiting ON turns (awaiting, id) WHERE awaiting = 1;
"""

MIGRATIONS: list[str] = [_V1, _V2, _V3_RESERVED, _V4]
SCHEMA_VERSION = len(MIGRATIONS)

#: Rows read per page when walking a channel's history newest first.
PAGE = 128


class MemoryError_(RuntimeError):
    """The database file is unusable (newer schema, not SQLite, ...)."""


# --------------------------------------------------------------------------------------------
# Records


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

    def to_turn(self) -> Turn:
        return Turn(self.role, self.content, self.name, self.tokens, self.id)


_TURN_COLUMNS = (
    "id, channel_id, guild_id, message_id, author_id, name, role, persona, content, tokens, "
    "created_at"
)


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


@dataclass(slots=True)
class StoredPersona:
    id: int
    guild_id: int
    name: str
    card: str  # Character Card V2 JSON
    avatar: bytes | None
    created_by: int
    created_at: float


@dataclass(slots=True)
class AuditRow:
    id: int
    guild_id: int | None
    channel_id: int | None
    user_id: int
    action: str
    old: str | None
    new: str | None
    created_at: float


@dataclass(slots=True)
class ChannelStats:
    turns: int
    tokens: int
    oldest: float | None
    newest: float | None


# --------------------------------------------------------------------------------------------
# The store


class Memory:
    """Async SQLite store. Open with `await Memory.open(path)`; close with `await close()`."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self.db = db
        self.path = path
        # One connection serves every coroutine: transactions must not interleave on it.
        self._write = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error; one at a time."""
        async with self._write:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    @classmethod
    async def open(cls, path: str | Path) -> Memory:
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is crash-safe in WAL mode (a killed process loses nothing committed);
            # only a power cut can lose the last commits, never corrupt the file.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA busy_timeout=5000")
            await migrate(db)
        except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged file, ...
            await db.close()
            raise MemoryError_(
                f"cannot use {path} as the bot's database ({exc}); "
                "point DB_PATH at another file or restore a backup"
            ) from None
        except Exception:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    async def _tx(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int | None]:
        """Run statements in one transaction; returns each one's lastrowid."""
        ids: list[int | None] = []
        async with self.transaction() as db:
            for sql, args in statements:
                cur = await db.execute(sql, args)
                ids.append(cur.lastrowid)
        return ids

    # ---- turns ------------------------------------------------------------------------------

    async def add_turn(
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
    ) -> int:
        """Store one turn (and every Discord message id it spans) in one transaction.

        `awaiting`: a user turn the bot owes a reply; `answers`: the user turn this reply
        answers, which stops awaiting in the same transaction.
        """
        ids = [m for m in (message_id, *extra_message_ids) if m is not None]
        async with self.transaction() as db:
            if answers is not None:
                await db.execute("UPDATE turns SET awaiting = 0 WHERE id = ?", (answers,))
            cur = await db.execute(
                "INSERT INTO turns (channel_id, guild_id, message_id, author_id, name, role, "
                "persona, content, tokens, created_at, awaiting) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
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
                ),
            )
            turn_id = int(cur.lastrowid or 0)
            await db.executemany(
                "INSERT OR REPLACE INTO turn_messages (message_id, turn_id) VALUES (?, ?)",
                [(m, turn_id) for m in ids],
            )
        return turn_id

    async def link_messages(self, turn_id: int, message_ids: Sequence[int]) -> None:
        """Attach further Discord messages (later chunks of a long reply) to a turn."""
        await self._tx(
            [
                (
                    "INSERT OR REPLACE INTO turn_messages (message_id, turn_id) VALUES (?, ?)",
                    (m, turn_id),
                )
                for m in message_ids
            ]
        )

    async def update_turn(
        self,
        turn_id: int,
        content: str,
        tokens: int | None = None,
        *,
        message_id: int | None = None,
    ) -> None:
        stmts: list[tuple[str, Sequence[Any]]] = [
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
        await self._tx(stmts)

    async def turn_for_message(self, message_id: int) -> StoredTurn | None:
        cur = await self.db.execute(
            f"SELECT {_prefixed('t')} FROM turn_messages m JOIN turns t ON t.id = m.turn_id "
            "WHERE m.message_id = ?",
            (message_id,),
        )
        row = await cur.fetchone()
        return StoredTurn(*row) if row else None

    async def edit_message(self, message_id: int, content: str, tokens: int | None = None) -> bool:
        """A Discord message was edited: its stored turn follows. Returns whether one existed."""
        turn = await self.turn_for_message(message_id)
        if turn is None:
            return False
        await self.update_turn(turn.id, content, tokens)
        return True

    async def delete_message(self, message_id: int) -> bool:
        """A Discord message was deleted: its turn goes (all chunks of a split reply with it)."""
        cur = await self.db.execute(
            "SELECT turn_id FROM turn_messages WHERE message_id = ?", (message_id,)
        )
        row = await cur.fetchone()
        if row is None:
            return False
        await self._tx([("DELETE FROM turns WHERE id = ?", (row[0],))])
        return True

    async def delete_turn(self, turn_id: int) -> None:
        await self._tx([("DELETE FROM turns WHERE id = ?", (turn_id,))])

    async def recent_turns(
        self,
        channel_id: int,
        *,
        limit: int | None = None,
        token_budget: int | None = None,
        include_forgotten: bool = False,
    ) -> list[StoredTurn]:
        """The channel's turns newest first, after the forget watermark.

        Reads page by page through the (channel_id, id) index and stops as soon as `limit` rows
        or `token_budget` cached tokens are reached, so a long channel costs what the window
        needs, not what the channel holds.
        """
        floor = 0 if include_forgotten else await self._watermark(channel_id)
        out: list[StoredTurn] = []
        tokens = 0
        before = None
        while True:
            page = PAGE if limit is None else min(PAGE, limit - len(out))
            if page <= 0:
                break
            sql = (
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE channel_id = ? AND id > ?"
                + (" AND id < ?" if before is not None else "")
                + " ORDER BY id DESC LIMIT ?"
            )
            args = (channel_id, floor, *(() if before is None else (before,)), page)
            cur = await self.db.execute(sql, args)
            rows = await cur.fetchall()
            for row in rows:
                turn = StoredTurn(*row)
                out.append(turn)
                tokens += (turn.tokens or len(turn.content) // 3) + 8
            if len(rows) < page or (token_budget is not None and tokens >= token_budget):
                break
            before = out[-1].id
        return out

    async def all_turns(self, channel_id: int) -> list[StoredTurn]:
        """Every stored turn of a channel, oldest first, forgotten ones included (for export)."""
        cur = await self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE channel_id = ? ORDER BY id", (channel_id,)
        )
        return [StoredTurn(*row) for row in await cur.fetchall()]

    async def last_assistant_turn(self, channel_id: int) -> StoredTurn | None:
        floor = await self._watermark(channel_id)
        cur = await self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE channel_id = ? AND id > ? "
            "AND role = 'assistant' ORDER BY id DESC LIMIT 1",
            (channel_id, floor),
        )
        row = await cur.fetchone()
        return StoredTurn(*row) if row else None

    async def message_ids(self, turn_id: int) -> list[int]:
        cur = await self.db.execute(
            "SELECT message_id FROM turn_messages WHERE turn_id = ? ORDER BY message_id",
            (turn_id,),
        )
        return [r[0] for r in await cur.fetchall()]

    async def stats(self, channel_id: int) -> ChannelStats:
        floor = await self._watermark(channel_id)
        cur = await self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0), MIN(created_at), MAX(created_at) "
            "FROM turns WHERE channel_id = ? AND id > ?",
            (channel_id, floor),
        )
        return ChannelStats(*(await cur.fetchone()))  # type: ignore[misc]

    async def clear_channel(self, channel_id: int) -> int:
        cur = await self.db.execute(
            "SELECT COUNT(*) FROM turns WHERE channel_id = ?", (channel_id,)
        )
        (n,) = await cur.fetchone()  # type: ignore[misc]
        await self._tx(
            [
                ("DELETE FROM turns WHERE channel_id = ?", (channel_id,)),
                (
                    "UPDATE channels SET forget_before = 0, forget_undo = NULL WHERE channel_id = ?",
                    (channel_id,),
                ),
            ]
        )
        return int(n)

    # ---- replies owed (catch-up) ------------------------------------------------------------

    async def mark_answered(self, turn_id: int) -> bool:
        """The reply to `turn_id` has started to show (or was settled otherwise): it is no
        longer owed. Returns whether it was still awaiting, so only one caller answers it."""
        before = self.db.total_changes
        await self._tx(
            [("UPDATE turns SET awaiting = 0 WHERE id = ? AND awaiting = 1", (turn_id,))]
        )
        return self.db.total_changes != before

    async def awaiting_turns(self) -> list[StoredTurn]:
        """Every user turn still owed a reply, in every channel, oldest first."""
        cur = await self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE awaiting = 1 ORDER BY id"
        )
        return [StoredTurn(*row) for row in await cur.fetchall()]

    async def is_awaiting(self, turn_id: int) -> bool:
        cur = await self.db.execute("SELECT awaiting FROM turns WHERE id = ?", (turn_id,))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def newest_message_id(self, channel_id: int, *, window: int = 50) -> int | None:
        """The newest Discord message id stored for a channel (among its last `window` turns:
        turns are stored in arrival order, give or take replies still streaming)."""
        cur = await self.db.execute(
            "SELECT MAX(m.message_id) FROM turn_messages m JOIN ("
            "SELECT id FROM turns WHERE channel_id = ? ORDER BY id DESC LIMIT ?) t "
            "ON m.turn_id = t.id",
            (channel_id, window),
        )
        row = await cur.fetchone()
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
            cur = await self.db.execute(
                "SELECT channel_id, guild_id FROM turns WHERE channel_id > ? "
                "ORDER BY channel_id LIMIT 1",
                (after,),
            )
            row = await cur.fetchone()
            if row is None:
                break
            found[row[0]] = row[1]
            after = row[0]
        cur = await self.db.execute("SELECT channel_id, guild_id FROM channels")
        for channel_id, guild_id in await cur.fetchall():
            if found.get(channel_id) is None:
                found[channel_id] = guild_id
        return sorted(found.items())

    # ---- forgetting -------------------------------------------------------------------------

    async def _watermark(self, channel_id: int) -> int:
        cur = await self.db.execute(
            "SELECT forget_before FROM channels WHERE channel_id = ?", (channel_id,)
        )
        row = await cur.fetchone()
        return row[0] if row else 0

    async def forget(self, channel_id: int, guild_id: int | None = None) -> int:
        """Hide everything stored so far from future prompts; nothing is deleted."""
        cur = await self.db.execute(
            "SELECT COALESCE(MAX(id), 0) FROM turns WHERE channel_id = ?", (channel_id,)
        )
        (top,) = await cur.fetchone()  # type: ignore[misc]
        await self._tx(
            [
                (
                    "INSERT INTO channels (channel_id, guild_id) VALUES (?, ?) "
                    "ON CONFLICT (channel_id) DO NOTHING",
                    (channel_id, guild_id),
                ),
                (
                    "UPDATE channels SET forget_undo = forget_before, forget_before = ?, updated_at = ? "
                    "WHERE channel_id = ?",
                    (top, time.time(), channel_id),
                ),
            ]
        )
        return int(top)

    async def unforget(self, channel_id: int) -> bool:
        """Undo the last forget. Returns False when there is nothing to undo."""
        state = await self.channel(channel_id)
        if state.forget_undo is None:
            return False
        await self._tx(
            [
                (
                    "UPDATE channels SET forget_before = forget_undo, forget_undo = NULL WHERE "
                    "channel_id = ?",
                    (channel_id,),
                ),
            ]
        )
        return True

    # ---- channel and guild settings ---------------------------------------------------------

    async def channel(self, channel_id: int) -> ChannelState:
        cur = await self.db.execute(
            "SELECT channel_id, guild_id, mode, persona, forget_before, forget_undo, settings "
            "FROM channels WHERE channel_id = ?",
            (channel_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return ChannelState(channel_id)
        return ChannelState(*row[:6], settings=json.loads(row[6]))  # type: ignore[misc]

    async def update_channel(
        self, channel_id: int, guild_id: int | None = None, **changes: Any
    ) -> None:
        """Set mode, persona or settings (a dict, replaced whole) for a channel."""
        allowed = {"mode", "persona", "settings"}
        if bad := set(changes) - allowed:
            raise ValueError(f"unknown channel fields: {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        values = [json.dumps(v) if k == "settings" else v for k, v in changes.items()]
        await self._tx(
            [
                (
                    "INSERT INTO channels (channel_id, guild_id) VALUES (?, ?) "
                    "ON CONFLICT (channel_id) DO NOTHING",
                    (channel_id, guild_id),
                ),
                (
                    f"UPDATE channels SET {sets}, updated_at = ? WHERE channel_id = ?",
                    (*values, time.time(), channel_id),
                ),
            ]
        )

    async def guild(self, guild_id: int) -> GuildState:
        cur = await self.db.execute(
            "SELECT guild_id, settings, default_persona, imports_allowed, reset_allowed, "
            "channel_allowlist FROM guilds WHERE guild_id = ?",
            (guild_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return GuildState(guild_id)
        return GuildState(
            row[0], json.loads(row[1]), row[2], bool(row[3]), bool(row[4]), json.loads(row[5])
        )

    async def update_guild(self, guild_id: int, **changes: Any) -> None:
        allowed = {
            "settings",
            "default_persona",
            "imports_allowed",
            "reset_allowed",
            "channel_allowlist",
        }
        if bad := set(changes) - allowed:
            raise ValueError(f"unknown guild fields: {sorted(bad)}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        values = [
            json.dumps(v) if k in ("settings", "channel_allowlist") else v
            for k, v in changes.items()
        ]
        await self._tx(
            [
                (
                    "INSERT INTO guilds (guild_id) VALUES (?) ON CONFLICT (guild_id) DO NOTHING",
                    (guild_id,),
                ),
                (
                    f"UPDATE guilds SET {sets}, updated_at = ? WHERE guild_id = ?",
                    (*values, time.time(), guild_id),
                ),
            ]
        )

    # ---- personas imported by servers -------------------------------------------------------

    async def save_persona(
        self,
        guild_id: int,
        name: str,
        card_json: str,
        created_by: int,
        avatar: bytes | None = None,
        *,
        replace: bool = False,
    ) -> int:
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
        return (await self._tx([(sql, (guild_id, name, card_json, avatar, created_by, now))]))[0]  # type: ignore[return-value]

    async def get_persona(self, guild_id: int, name: str) -> StoredPersona | None:
        cur = await self.db.execute(
            "SELECT id, guild_id, name, card, avatar, created_by, created_at FROM personas "
            "WHERE guild_id = ? AND name = ? COLLATE NOCASE",
            (guild_id, name),
        )
        row = await cur.fetchone()
        return StoredPersona(*row) if row else None

    async def list_personas(self, guild_id: int) -> list[StoredPersona]:
        cur = await self.db.execute(
            "SELECT id, guild_id, name, card, avatar, created_by, created_at FROM personas "
            "WHERE guild_id = ? ORDER BY name COLLATE NOCASE",
            (guild_id,),
        )
        return [StoredPersona(*row) for row in await cur.fetchall()]

    async def delete_persona(self, guild_id: int, name: str) -> bool:
        cur = await self.db.execute(
            "SELECT id FROM personas WHERE guild_id = ? AND name = ? COLLATE NOCASE",
            (guild_id, name),
        )
        row = await cur.fetchone()
        if row is None:
            return False
        await self._tx([("DELETE FROM personas WHERE id = ?", (row[0],))])
        return True

    # ---- webhooks the bot owns --------------------------------------------------------------

    async def webhook(self, channel_id: int) -> tuple[int, str] | None:
        cur = await self.db.execute(
            "SELECT webhook_id, token FROM webhooks WHERE channel_id = ?", (channel_id,)
        )
        row = await cur.fetchone()
        return (row[0], row[1]) if row else None

    async def save_webhook(self, channel_id: int, webhook_id: int, token: str) -> None:
        await self._tx(
            [("INSERT OR REPLACE INTO webhooks VALUES (?, ?, ?)", (channel_id, webhook_id, token))]
        )

    async def forget_webhook(self, channel_id: int) -> None:
        await self._tx([("DELETE FROM webhooks WHERE channel_id = ?", (channel_id,))])

    async def webhook_ids(self) -> set[int]:
        cur = await self.db.execute("SELECT webhook_id FROM webhooks")
        return {r[0] for r in await cur.fetchall()}

    # ---- access -----------------------------------------------------------------------------

    async def set_blocked(self, guild_id: int, kind: str, target_id: int, blocked: bool) -> bool:
        """Block or unblock a user or role. Returns whether anything changed."""
        if blocked:
            sql = "INSERT OR IGNORE INTO access (guild_id, kind, target_id) VALUES (?, ?, ?)"
        else:
            sql = "DELETE FROM access WHERE guild_id = ? AND kind = ? AND target_id = ?"
        before = self.db.total_changes
        await self._tx([(sql, (guild_id, kind, target_id))])
        return self.db.total_changes != before

    async def blocked(self, guild_id: int) -> tuple[set[int], set[int]]:
        """(blocked user ids, blocked role ids) of a guild."""
        cur = await self.db.execute(
            "SELECT kind, target_id FROM access WHERE guild_id = ?", (guild_id,)
        )
        users: set[int] = set()
        roles: set[int] = set()
        for kind, target in await cur.fetchall():
            (users if kind == "user" else roles).add(target)
        return users, roles

    # ---- audit ------------------------------------------------------------------------------

    async def audit(
        self,
        user_id: int,
        action: str,
        *,
        guild_id: int | None = None,
        channel_id: int | None = None,
        old: Any = None,
        new: Any = None,
    ) -> None:
        def text(v: Any) -> str | None:
            return None if v is None else v if isinstance(v, str) else json.dumps(v)

        await self._tx(
            [
                (
                    "INSERT INTO audit (guild_id, channel_id, user_id, action, old, new, created_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (guild_id, channel_id, user_id, action, text(old), text(new), time.time()),
                ),
            ]
        )

    async def audit_log(self, guild_id: int | None, limit: int = 20) -> list[AuditRow]:
        cur = await self.db.execute(
            "SELECT id, guild_id, channel_id, user_id, action, old, new, created_at FROM audit "
            "WHERE guild_id IS ? ORDER BY id DESC LIMIT ?",
            (guild_id, limit),
        )
        return [AuditRow(*row) for row in await cur.fetchall()]


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{c.strip()}" for c in _TURN_COLUMNS.split(","))


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the file to SCHEMA_VERSION, one version per transaction. Returns the old version."""
    (version,) = await (await db.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
    if version > SCHEMA_VERSION:
        raise MemoryError_(
            f"the database is schema version {version}, newer than this bot ({SCHEMA_VERSION}); "
            "upgrade the bot or point DB_PATH at another file"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[target - 1].split(";"):
                if statement.strip():
                    await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
    return int(version)
