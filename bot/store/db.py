"""The bot's SQLite file: the connection (aiosqlite, WAL), its schema version and migrations.

Why SQLite: a self-hosted bot wants one file the user can back up, and WAL gives crash safety
(a killed process loses at most the transaction it was in) with readers that never block the
writer. The schema version lives in `PRAGMA user_version`; `MIGRATIONS` are applied in order at
start, each in its own transaction, so an old file is brought forward without losing anything.
Every store in `bot.store` shares one `Database` (one connection, one write lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

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


async def ensure_owed_replies(db: aiosqlite.Connection) -> None:
    """v4: replies owed. A user turn the bot decided to answer is stored `awaiting = 1`; the
    reply's first message clears it (`OwedReplies.mark_answered`, or `TurnStore.add(answers=...)`
    with the bot's turn). What still awaits at start was queued when the bot stopped, and
    catch-up answers it.

    Idempotent (the column is added only when missing), so it applies after v3 whatever v3
    built, and `Database.open` runs it again for a file that skipped it (one numbered 4 before
    this version was placed ahead of the scenes one).
    """
    cur = await db.execute("PRAGMA table_info(turns)")
    if "awaiting" not in {row[1] for row in await cur.fetchall()}:
        await db.execute("ALTER TABLE turns ADD COLUMN awaiting INTEGER NOT NULL DEFAULT 0")
    await db.execute(
        "CREATE INDEX IF NOT EXISTS turns_awaiting ON turns (awaiting, id) WHERE awaiting = 1"
    )


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


# v6: a reply being posted to an owed turn (`bot.store.owed.OwedReplies.posting`). The row exists
# from just before the reply's first message is sent until the owed turn is settled; the message
# id is filled in once Discord returns it. After a crash (SIGKILL between the post and storing
# the reply) catch-up finds the row and adopts the reply already in the channel instead of
# posting a second one. IF NOT EXISTS: independent of every other version but v1.
_V6 = """
CREATE TABLE IF NOT EXISTS reply_posts (
    turn_id     INTEGER PRIMARY KEY REFERENCES turns (id) ON DELETE CASCADE,
    persona     TEXT,
    message_id  INTEGER
);
"""


async def ensure_turn_flags(db: aiosqlite.Connection) -> None:
    """v7: two marks on a turn. `hidden`: left out of prompts, recall and the training export
    but kept (the "Hide from the bot" message command, out-of-character lines); `stopped`: a
    reply whose generation a member stopped with its ⏹ button, stored as far as it got.
    Idempotent (columns added only when missing), so it depends on no other version but v1."""
    cur = await db.execute("PRAGMA table_info(turns)")
    have = {row[1] for row in await cur.fetchall()}
    for column in ("hidden", "stopped"):
        if column not in have:
            await db.execute(f"ALTER TABLE turns ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")


async def threads_mode(db: aiosqlite.Connection) -> None:
    """v8: a channel mode `threads` (`bot.policy.MODES`): v1's CHECK on `channels.mode` named
    only off, mention and always. SQLite cannot alter a CHECK, so the table is rebuilt from its
    own stored definition with the new list: columns added since v1 (by any version) are kept
    as they are, and nothing references `channels`, so dropping the old table is safe."""
    row = await (
        await db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'channels'")
    ).fetchone()
    assert row is not None
    old_check = "mode IN ('off', 'mention', 'always')"
    sql = str(row[0])
    if old_check not in sql:
        return  # already rebuilt
    new_sql = sql.replace(old_check, "mode IN ('off', 'mention', 'always', 'threads')", 1)
    new_sql = new_sql.replace("CREATE TABLE channels", "CREATE TABLE channels_v8", 1)
    await db.execute(new_sql)
    await db.execute("INSERT INTO channels_v8 SELECT * FROM channels")
    await db.execute("DROP TABLE channels")
    await db.execute("ALTER TABLE channels_v8 RENAME TO channels")


# v9: what the prompt holds besides the turns (`bot.store.notes`): a channel's notes, its rolling
# summary with the range of turns it covers, and members' own cards (`/me describe`, one per
# member and server, or DM channel). IF NOT EXISTS: independent of every other version.
_V9 = """
CREATE TABLE IF NOT EXISTS notes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id  INTEGER NOT NULL,
    guild_id    INTEGER,
    author_id   INTEGER,
    text        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS notes_by_channel ON notes (channel_id, id);
CREATE TABLE IF NOT EXISTS summaries (
    channel_id  INTEGER PRIMARY KEY,
    text        TEXT NOT NULL,
    first_id    INTEGER NOT NULL,
    last_id     INTEGER NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS member_cards (
    place_id    INTEGER NOT NULL,
    user_id     INTEGER NOT NULL,
    text        TEXT NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (place_id, user_id)
);
"""


# v10: images members attached, kept for a vision model (`bot.store.images`, VISION). They go
# with their turn. IF NOT EXISTS: independent of every other version but v1.
_V10 = """
CREATE TABLE IF NOT EXISTS turn_images (
    turn_id  INTEGER NOT NULL REFERENCES turns (id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    mime     TEXT NOT NULL,
    data     BLOB NOT NULL,
    PRIMARY KEY (turn_id, idx)
);
"""


Migration = str | Callable[[aiosqlite.Connection], Awaitable[Any]]
#: Version n is `MIGRATIONS[n - 1]`: a statement list, or a function run inside the transaction.
MIGRATIONS: list[Migration] = [
    _V1,
    _V2,
    ensure_fts,
    ensure_owed_replies,
    _V5,
    _V6,
    ensure_turn_flags,
    threads_mode,
    _V9,
    _V10,
]
SCHEMA_VERSION = len(MIGRATIONS)


class UnusableDatabaseError(RuntimeError):
    """The database file is unusable (newer schema, not SQLite, ...); the message says what to do."""


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the file to SCHEMA_VERSION, one version per transaction. Returns the old version."""
    (version,) = await (await db.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
    if version > SCHEMA_VERSION:
        raise UnusableDatabaseError(
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


#: One statement and its parameters, for `Database.run`.
Statement = tuple[str, Sequence[Any]]


class Database:
    """The one connection every store shares. Open with `await Database.open(path)`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, *, fts: bool = False) -> None:
        """`conn`: an open connection to a migrated file (what `open` makes); `fts`: whether
        recall's full-text index is there to use (`open` probes it; False turns recall off)."""
        self.conn = conn
        self.path = path
        #: Whether the full-text index behind recall exists (False on SQLite builds without FTS5).
        self.fts = fts
        # One connection serves every coroutine: transactions must not interleave on it.
        self._write = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> Database:
        """Connect, set WAL, migrate; an unusable file raises `UnusableDatabaseError`."""
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)  # explicit transactions only
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is crash-safe in WAL mode (a killed process loses nothing committed);
            # only a power cut can lose the last commits, never corrupt the file.
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
            await migrate(conn)
            # FTS5 may have appeared (or gone) since the file was last migrated; a file numbered
            # past v4 without it gets the owed-replies column too.
            await conn.execute("BEGIN IMMEDIATE")
            fts = await ensure_fts(conn)
            await ensure_owed_replies(conn)
            await conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:  # "file is not a database", a damaged file, ...
            await conn.close()
            raise UnusableDatabaseError(
                f"cannot use {path} as the bot's database ({exc}); "
                "point DB_PATH at another file or restore a backup"
            ) from None
        except Exception:
            await conn.close()
            raise
        return cls(conn, path, fts=fts)

    async def close(self) -> None:
        await self.conn.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error; one at a time."""
        async with self._write:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                await self.conn.execute("COMMIT")
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise

    async def run(self, statements: Sequence[Statement]) -> list[int | None]:
        """Run statements in one transaction; returns each one's lastrowid."""
        ids: list[int | None] = []
        async with self.transaction() as conn:
            for sql, args in statements:
                cur = await conn.execute(sql, args)
                ids.append(cur.lastrowid)
        return ids

    async def changed(self, statements: Sequence[Statement]) -> bool:
        """Run statements in one transaction; whether they changed any row."""
        changed = 0
        async with self.transaction() as conn:
            for sql, args in statements:
                cur = await conn.execute(sql, args)
                changed += max(cur.rowcount, 0)
        return changed > 0

    async def upsert(self, table: str, row: dict[str, Any], changes: dict[str, Any]) -> None:
        """Create `row` in `table` if its key (the first column of `row`) is new, then set
        `changes` and `updated_at` on it, in one transaction. Column names come from code
        (each store checks them against its fields), never from users."""
        key, key_value = next(iter(row.items()))
        stmts: list[Statement] = [
            (
                f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                f"ON CONFLICT ({key}) DO NOTHING",
                tuple(row.values()),
            )
        ]
        if changes:
            sets = ", ".join(f"{column} = ?" for column in changes)
            stmts.append(
                (
                    f"UPDATE {table} SET {sets}, updated_at = ? WHERE {key} = ?",
                    (*changes.values(), time.time(), key_value),
                )
            )
        await self.run(stmts)

    async def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """The first row of a read (None when there is none)."""
        cur = await self.conn.execute(sql, args)
        return await cur.fetchone()

    async def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Every row of a read."""
        cur = await self.conn.execute(sql, args)
        return list(await cur.fetchall())


class Store:
    """One kind of record in the shared database (`bot.store.turns`, `places`, ...)."""

    def __init__(self, db: Database) -> None:
        self.db = db
