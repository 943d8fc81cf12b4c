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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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

# v3: the full-text index behind recall (FTS5, BM25). An external-content table over `turns`
# kept in step by triggers, so the text is stored once and insert/edit/delete/clear follow it.
# Porter stemming lets "lives" find "live"; the speaker's name is indexed too. Trigger bodies
# hold ';', so this version is code, not a statement list (see `ensure_fts`).
_FTS = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS turns_fts USING fts5(name, content, content='turns', "
    "content_rowid='id', tokenize='porter unicode61 remove_diacritics 2')",
    "CREATE TRIGGER IF NOT EXISTS turns_fts_insert AFTER INSERT ON turns BEGIN "
    "INSERT INTO turns_fts (rowid, name, content) VALUES (new.id, new.name, new.content); END",
    "CREATE TRIGGER IF NOT EXISTS turns_fts_delete AFTER DELETE ON turns BEGIN "
    "INSERT INTO turns_fts (turns_fts, rowid, name, content) "
    "VALUES ('delete', old.id, old.name, old.content); END",
    "CREATE TRIGGER IF NOT EXISTS turns_fts_update AFTER UPDATE OF name, content ON turns BEGIN "
    "INSERT INTO turns_fts (turns_fts, rowid, name, content) "
    "VALUES ('delete', old.id, old.name, old.content); "
    "INSERT INTO turns_fts (rowid, name, content) VALUES (new.id, new.name, new.content); END",
]
_FTS_TRIGGERS = ("turns_fts_insert", "turns_fts_delete", "turns_fts_update")


async def fts5_available(db: aiosqlite.Connection) -> bool:
    """Whether this SQLite build has FTS5 (most do; some distribution builds do not)."""
    try:
        await db.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        await db.execute("DROP TABLE temp.fts5_probe")
    except sqlite3.OperationalError:
        return False
    return True


async def ensure_fts(db: aiosqlite.Connection) -> bool:
    """Create the recall index if FTS5 exists and the index does not; returns whether it is on.

    Idempotent, and run inside the caller's transaction. Without FTS5 the triggers are dropped
    (a file indexed elsewhere must stay writable here) and recall is off.
    """
    if not await fts5_available(db):
        for trigger in _FTS_TRIGGERS:
            await db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        return False
    cur = await db.execute("SELECT 1 FROM sqlite_master WHERE name = 'turns_fts'")
    existed = await cur.fetchone() is not None
    for statement in _FTS:
        await db.execute(statement)
    if not existed:  # index what the file already holds (a v2 database, or one built without FTS5)
        await db.execute("INSERT INTO turns_fts (turns_fts) VALUES ('rebuild')")
    return True


# v5: scenes (several personas in one channel) and swipes (alternative replies of one turn).
# Numbered after v3 (recall's full-text index) and v4 (the reply path's); it depends on neither
# (every statement is IF NOT EXISTS over v1/v2 tables), so a merge only orders the list.
_V5 = """
CREATE TABLE IF NOT EXISTS scenes (
    channel_id  INTEGER PRIMARY KEY,
    guild_id    INTEGER,
    policy      TEXT NOT NULL DEFAULT 'natural' CHECK (policy IN ('natural', 'list', 'manual')),
    scenario    TEXT NOT NULL DEFAULT '',
    next_seat   INTEGER NOT NULL DEFAULT 0,
    manual_next TEXT,
    updated_at  REAL
);
CREATE TABLE IF NOT EXISTS scene_members (
    channel_id     INTEGER NOT NULL REFERENCES scenes (channel_id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    seat           INTEGER NOT NULL,
    muted          INTEGER NOT NULL DEFAULT 0,
    nicknames      TEXT NOT NULL DEFAULT '[]',
    talkativeness  REAL,
    PRIMARY KEY (channel_id, name COLLATE NOCASE)
);
CREATE TABLE IF NOT EXISTS swipes (
    turn_id   INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
    idx       INTEGER NOT NULL,
    content   TEXT NOT NULL,
    tokens    INTEGER,
    PRIMARY KEY (turn_id, idx)
);
CREATE TABLE IF NOT EXISTS swipe_turns (
    turn_id    INTEGER PRIMARY KEY REFERENCES turns (id) ON DELETE CASCADE,
    shown      INTEGER NOT NULL DEFAULT 0,
    reply_to   INTEGER,
    requester  INTEGER
);
"""


async def ensure_owed_replies(db: aiosqlite.Connection) -> None:
    """v4: replies owed. A user turn the bot decided to answer is stored `awaiting = 1`; the
    reply's first message clears it (`mark_answered`, or `add_turn(answers=...)` with the bot's
    turn). What still awaits at start was queued when the bot stopped, and catch-up answers it.

    Idempotent (the column is added only when missing), so it applies after v3 whatever v3
    built, and `Memory.open` runs it again for a file that skipped it (one numbered 4 before this
    version was placed ahead of the scenes one).
    """
    cur = await db.execute("PRAGMA table_info(turns)")
    if "awaiting" not in {row[1] for row in await cur.fetchall()}:
        await db.execute("ALTER TABLE turns ADD COLUMN awaiting INTEGER NOT NULL DEFAULT 0")
    await db.execute(
        "CREATE INDEX IF NOT EXISTS turns_awaiting ON turns (awaiting, id) WHERE awaiting = 1"
    )


Migration = str | Callable[[aiosqlite.Connection], Awaitable[Any]]
MIGRATIONS: list[Migration] = [_V1, _V2, ensure_fts, ensure_owed_replies, _V5]
SCHEMA_VERSION = len(MIGRATIONS)

#: Rows read per page when walking a channel's history newest first.
PAGE = 128
#: Most (member, name) pairs `Memory.speakers` reads for one place.
SPEAKERS_LIMIT = 5000


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
        return Turn(
            self.role,
            self.content,
            self.name,
            self.tokens,
            self.id,
            self.created_at,
            self.author_id if self.role == "user" else None,
        )


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
class SceneMember:
    name: str
    seat: int
    muted: bool = False
    nicknames: list[str] = field(default_factory=list)
    talkativeness: float | None = None  # None: the card's (extensions.talkativeness)


@dataclass(slots=True)
class SceneState:
    """A channel's cast, in seating order, and how the next speaker is chosen."""

    channel_id: int
    guild_id: int | None = None
    policy: str = "natural"  # natural | list | manual
    scenario: str = ""
    next_seat: int = 0  # round robin position (policy `list`)
    manual_next: str | None = None  # who speaks next (policy `manual`)
    members: list[SceneMember] = field(default_factory=list)


@dataclass(slots=True)
class SwipeState:
    """The alternatives of one reply, the one shown now, and who may swipe it."""

    turn_id: int
    shown: int
    alternatives: list[str]
    reply_to: int | None
    requester: int | None


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

    def __init__(self, db: aiosqlite.Connection, path: Path, *, fts: bool = False) -> None:
        self.db = db
        self.path = path
        #: Whether the full-text index behind recall exists (False on SQLite builds without FTS5).
        self.fts = fts
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
            # FTS5 may have appeared (or gone) since the file was last migrated; a file numbered
            # past v4 without it gets the owed-replies column too.
            await db.execute("BEGIN IMMEDIATE")
            fts = await ensure_fts(db)
            await ensure_owed_replies(db)
            await db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged file, ...
            await db.close()
            raise MemoryError_(
                f"cannot use {path} as the bot's database ({exc}); "
                "point DB_PATH at another file or restore a backup"
            ) from None
        except Exception:
            await db.close()
            raise
        return cls(db, path, fts=fts)

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

    async def search_turns(
        self,
        channel_id: int,
        match: str,
        *,
        before_id: int | None = None,
        limit: int = 16,
    ) -> list[tuple[StoredTurn, StoredTurn | None]]:
        """The channel's turns matching an FTS5 `match` expression, best BM25 score first, each
        with the turn just before it (its context; None for the channel's first turn).

        Only turns after the forget watermark and (when given) before `before_id` are searched,
        so forgotten turns and the ones already in the prompt are never found. A hit on the
        message text weighs twice one on the speaker's name. Two queries whatever the hit
        count: this runs before every reply in a long channel. Empty when the index is off.
        """
        if not self.fts or not match:
            return []
        floor = "COALESCE((SELECT forget_before FROM channels WHERE channel_id = ?1), 0)"
        cur = await self.db.execute(
            f"SELECT {_prefixed('t')}, (SELECT MAX(p.id) FROM turns p WHERE p.channel_id = ?1 "
            f"AND p.id < t.id AND p.id > {floor}) FROM turns_fts JOIN turns t "
            "ON t.id = turns_fts.rowid WHERE turns_fts MATCH ?2 AND t.channel_id = ?1 "
            f"AND t.id > {floor} AND t.id < ?3 ORDER BY bm25(turns_fts, 0.5, 1.0) LIMIT ?4",
            (channel_id, match, before_id if before_id is not None else 2**62, limit),
        )
        rows = await cur.fetchall()
        context_ids = sorted({row[-1] for row in rows if row[-1] is not None})
        context: dict[int, StoredTurn] = {}
        if context_ids:
            marks = ",".join("?" * len(context_ids))
            cur = await self.db.execute(
                f"SELECT {_TURN_COLUMNS} FROM turns WHERE id IN ({marks})", context_ids
            )
            context = {row[0]: StoredTurn(*row) for row in await cur.fetchall()}
        return [
            (StoredTurn(*row[:-1]), context.get(row[-1]) if row[-1] is not None else None)
            for row in rows
        ]

    async def snippet(self, turn_id: int, match: str, words: int) -> str:
        """FTS5's `snippet()` of a turn's text: the window of about `words` words (at most 64)
        that holds the most of what `match` finds, "…" where text was cut. Empty when the
        index is off or the turn does not match."""
        if not self.fts or not match:
            return ""
        cur = await self.db.execute(
            "SELECT snippet(turns_fts, 1, '', '', '…', ?1) FROM turns_fts "
            "WHERE turns_fts MATCH ?2 AND rowid = ?3",
            (max(1, min(words, 64)), match, turn_id),
        )
        row = await cur.fetchone()
        return row[0] if row and row[0] else ""

    async def all_turns(self, channel_id: int) -> list[StoredTurn]:
        """Every stored turn of a channel, oldest first, forgotten ones included (for export)."""
        cur = await self.db.execute(
            f"SELECT {_TURN_COLUMNS} FROM turns WHERE channel_id = ? ORDER BY id", (channel_id,)
        )
        return [StoredTurn(*row) for row in await cur.fetchall()]

    async def export_jsonl(self, channel_id: int) -> tuple[int, bytes]:
        """(turn count, the `/admin memory export` file): one JSON line per stored turn, oldest
        first, forgotten ones included and marked, so `training/`'s `hermes-memory` source can
        leave them out. The one definition of that file's format."""
        turns = await self.all_turns(channel_id)
        floor = await self._watermark(channel_id)
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
                },
                ensure_ascii=False,
            )
            for t in turns
        ]
        return len(turns), ("\n".join(lines) + ("\n" if lines else "")).encode()

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

    async def speakers(
        self, guild_id: int | None, channel_id: int, limit: int = SPEAKERS_LIMIT
    ) -> list[tuple[int, str]]:
        """(author id, name) of members who spoke in the server (in the channel, for a DM),
        each name as stored with their turns; the most recent `limit` pairs. Read once per
        place by `Conversations`, which then keeps the set in step as members speak."""
        where = "guild_id = ?" if guild_id is not None else "channel_id = ?"
        cur = await self.db.execute(
            "SELECT author_id, name FROM turns WHERE role = 'user' AND author_id IS NOT NULL "
            f"AND {where} GROUP BY author_id, name ORDER BY MAX(id) DESC LIMIT ?",
            (guild_id if guild_id is not None else channel_id, limit),
        )
        return [(row[0], row[1]) for row in await cur.fetchall()]

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

    # ---- scenes ---------------------------------------------------------------------------

    async def scene(self, channel_id: int) -> SceneState:
        """The channel's scene (no members when it has none)."""
        cur = await self.db.execute(
            "SELECT channel_id, guild_id, policy, scenario, next_seat, manual_next FROM scenes "
            "WHERE channel_id = ?",
            (channel_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return SceneState(channel_id)
        state = SceneState(*row)  # type: ignore[arg-type]
        cur = await self.db.execute(
            "SELECT name, seat, muted, nicknames, talkativeness FROM scene_members "
            "WHERE channel_id = ? ORDER BY seat",
            (channel_id,),
        )
        state.members = [
            SceneMember(r[0], r[1], bool(r[2]), json.loads(r[3]), r[4])
            for r in await cur.fetchall()
        ]
        return state

    async def update_scene(self, channel_id: int, guild_id: int | None, **changes: Any) -> None:
        """Set policy, scenario, next_seat or manual_next of a channel's scene."""
        allowed = {"policy", "scenario", "next_seat", "manual_next"}
        if bad := set(changes) - allowed:
            raise ValueError(f"unknown scene fields: {sorted(bad)}")
        stmts: list[tuple[str, Sequence[Any]]] = [
            (
                "INSERT INTO scenes (channel_id, guild_id) VALUES (?, ?) "
                "ON CONFLICT (channel_id) DO NOTHING",
                (channel_id, guild_id),
            )
        ]
        if changes:
            sets = ", ".join(f"{k} = ?" for k in changes)
            stmts.append(
                (
                    f"UPDATE scenes SET {sets}, updated_at = ? WHERE channel_id = ?",
                    (*changes.values(), time.time(), channel_id),
                )
            )
        await self._tx(stmts)

    async def add_scene_member(
        self,
        channel_id: int,
        guild_id: int | None,
        name: str,
        *,
        nicknames: Sequence[str] = (),
        talkativeness: float | None = None,
    ) -> None:
        """Seat `name` last (or update its nicknames and talkativeness if already seated)."""
        await self.update_scene(channel_id, guild_id)
        await self._tx(
            [
                (
                    "INSERT INTO scene_members (channel_id, name, seat, nicknames, talkativeness) "
                    "VALUES (?, ?, (SELECT COALESCE(MAX(seat), -1) + 1 FROM scene_members "
                    "WHERE channel_id = ?), ?, ?) ON CONFLICT (channel_id, name) DO UPDATE SET "
                    "nicknames = excluded.nicknames, talkativeness = excluded.talkativeness",
                    (channel_id, name, channel_id, json.dumps(list(nicknames)), talkativeness),
                )
            ]
        )

    async def update_scene_member(self, channel_id: int, name: str, *, muted: bool) -> bool:
        before = self.db.total_changes
        await self._tx(
            [
                (
                    "UPDATE scene_members SET muted = ? WHERE channel_id = ? "
                    "AND name = ? COLLATE NOCASE",
                    (int(muted), channel_id, name),
                )
            ]
        )
        return self.db.total_changes != before

    async def remove_scene_member(self, channel_id: int, name: str) -> bool:
        before = self.db.total_changes
        await self._tx(
            [
                (
                    "DELETE FROM scene_members WHERE channel_id = ? AND name = ? COLLATE NOCASE",
                    (channel_id, name),
                )
            ]
        )
        return self.db.total_changes != before

    async def clear_scene(self, channel_id: int) -> int:
        """Remove the whole scene; returns how many members it had."""
        scene = await self.scene(channel_id)
        await self._tx([("DELETE FROM scenes WHERE channel_id = ?", (channel_id,))])
        return len(scene.members)

    # ---- swipes (alternative replies) -----------------------------------------------------

    async def start_swipes(
        self, turn_id: int, content: str, tokens: int | None, *, reply_to: int | None,
        requester: int | None,
    ) -> None:  # fmt: skip
        """Record a reply's first alternative (its text now) and who may swipe it."""
        await self._tx(
            [
                (
                    "INSERT OR REPLACE INTO swipe_turns (turn_id, shown, reply_to, requester) "
                    "VALUES (?, 0, ?, ?)",
                    (turn_id, reply_to, requester),
                ),
                (
                    "INSERT OR REPLACE INTO swipes (turn_id, idx, content, tokens) "
                    "VALUES (?, 0, ?, ?)",
                    (turn_id, content, tokens),
                ),
            ]
        )

    async def swipes(self, turn_id: int) -> SwipeState | None:
        cur = await self.db.execute(
            "SELECT shown, reply_to, requester FROM swipe_turns WHERE turn_id = ?", (turn_id,)
        )
        row = await cur.fetchone()
        if row is None:
            return None
        cur = await self.db.execute(
            "SELECT content FROM swipes WHERE turn_id = ? ORDER BY idx", (turn_id,)
        )
        texts = [r[0] for r in await cur.fetchall()]
        return SwipeState(turn_id, row[0], texts, row[1], row[2])

    async def add_swipe(self, turn_id: int, content: str, tokens: int | None) -> int:
        """Store another alternative and show it (the turn's text becomes it); its index."""
        async with self.transaction() as db:
            cur = await db.execute(
                "SELECT COALESCE(MAX(idx), -1) + 1 FROM swipes WHERE turn_id = ?", (turn_id,)
            )
            (idx,) = await cur.fetchone()  # type: ignore[misc]
            await db.execute(
                "INSERT INTO swipes (turn_id, idx, content, tokens) VALUES (?, ?, ?, ?)",
                (turn_id, idx, content, tokens),
            )
            await db.execute("UPDATE swipe_turns SET shown = ? WHERE turn_id = ?", (idx, turn_id))
            await db.execute(
                "UPDATE turns SET content = ?, tokens = ? WHERE id = ?", (content, tokens, turn_id)
            )
        return int(idx)

    async def show_swipe(self, turn_id: int, idx: int) -> str | None:
        """Show alternative `idx`: the turn's text becomes it (what memory keeps). Its text."""
        async with self.transaction() as db:
            cur = await db.execute(
                "SELECT content, tokens FROM swipes WHERE turn_id = ? AND idx = ?", (turn_id, idx)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            await db.execute("UPDATE swipe_turns SET shown = ? WHERE turn_id = ?", (idx, turn_id))
            await db.execute(
                "UPDATE turns SET content = ?, tokens = ? WHERE id = ?", (row[0], row[1], turn_id)
            )
        return str(row[0])

    async def end_swipes(self, turn_id: int) -> None:
        """The reply is settled as it is now (e.g. `/continue` extended it)."""
        await self._tx([("DELETE FROM swipe_turns WHERE turn_id = ?", (turn_id,))])

    async def later_user_turn(self, channel_id: int, turn_id: int) -> bool:
        """Has a member spoken in the channel since turn `turn_id`?"""
        cur = await self.db.execute(
            "SELECT 1 FROM turns WHERE channel_id = ? AND id > ? AND role = 'user' LIMIT 1",
            (channel_id, turn_id),
        )
        return await cur.fetchone() is not None

    async def turn(self, turn_id: int) -> StoredTurn | None:
        cur = await self.db.execute(f"SELECT {_TURN_COLUMNS} FROM turns WHERE id = ?", (turn_id,))
        row = await cur.fetchone()
        return StoredTurn(*row) if row else None


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
            step = MIGRATIONS[target - 1]
            if callable(step):
                await step(db)
            else:
                for statement in step.split(";"):
                    if statement.strip():
                        await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
    return int(version)
