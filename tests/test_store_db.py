"""The database file: migrations from every earlier schema version, clear errors for files the
bot cannot use, one shared connection under concurrent writers, and durability under SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiosqlite
import pytest

from bot.memory import Memory
from bot.store.db import MIGRATIONS, SCHEMA_VERSION, UnusableDatabaseError


def user_version(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute("PRAGMA user_version").fetchone()[0]
    finally:
        con.close()


def tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


@pytest.mark.parametrize("zero_byte_file", [False, True])
async def test_migrates_a_new_or_empty_file(tmp_path: Path, zero_byte_file: bool):
    path = tmp_path / "sub" / "dir" / "new.db"
    if zero_byte_file:
        path.parent.mkdir(parents=True)
        path.touch()
    mem = await Memory.open(path)
    await mem.close()
    assert user_version(path) == SCHEMA_VERSION == len(MIGRATIONS)
    assert {"turns", "turn_messages", "channels", "guilds", "personas", "audit"} <= tables(path)
    mem = await Memory.open(path)  # reopening an up-to-date file changes nothing
    await mem.close()
    assert user_version(path) == SCHEMA_VERSION


async def test_migrates_from_v1_keeping_turns(tmp_path: Path):
    path = tmp_path / "v1.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0])
    con.execute("PRAGMA user_version=1")
    for i in range(5):
        con.execute(
            "INSERT INTO turns (channel_id, guild_id, message_id, name, role, content, tokens, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (11, 3, 900 + i, "Ann", "user" if i % 2 == 0 else "assistant", f"old {i}", 2, 1.0 + i),
        )
        con.execute("INSERT INTO turn_messages VALUES (?, ?)", (900 + i, i + 1))
    con.execute("INSERT INTO channels (channel_id, mode, forget_before) VALUES (11, 'always', 1)")
    con.commit()
    con.close()
    assert user_version(path) == 1 and "guilds" not in tables(path)

    mem = await Memory.open(path)
    try:
        assert user_version(path) == SCHEMA_VERSION
        assert "guilds" in tables(path) and "personas" in tables(path)
        turns = await mem.turns.history(11)
        assert [t.content for t in turns] == [f"old {i}" for i in range(5)]
        assert [t.message_id for t in turns] == [900, 901, 902, 903, 904]
        # the v1 watermark still applies, and the v2 tables work
        assert [t.content for t in await mem.turns.recent(11)] == [
            "old 4",
            "old 3",
            "old 2",
            "old 1",
        ]
        assert (await mem.places.channel(11)).mode == "always"
        await mem.places.update_guild(3, default_persona="pirate")
        assert (await mem.places.guild(3)).default_persona == "pirate"
        assert await mem.turns.delete_message(903)
        assert len(await mem.turns.history(11)) == 4
    finally:
        await mem.close()


async def test_newer_schema_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "future.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(UnusableDatabaseError) as info:
        await Memory.open(path)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and "newer" in message
    assert "DB_PATH" in message
    assert user_version(path) == SCHEMA_VERSION + 1  # left untouched


async def test_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(UnusableDatabaseError) as info:
        await Memory.open(path)
    assert str(path) in str(info.value) and "DB_PATH" in str(info.value)
    assert path.read_bytes().startswith(b"these are my notes")  # left untouched


async def test_concurrent_writers_share_the_connection(memory: Memory):
    """Many coroutines storing at once (messages from several channels) never interleave."""

    async def writer(channel: int) -> list[int]:
        ids = []
        for i in range(10):
            ids.append(
                await memory.turns.add(
                    channel, "user", f"c{channel} m{i}", message_id=channel * 100 + i
                )
            )
            if i == 5:
                await memory.turns.forget(channel)
        return ids

    results = await asyncio.gather(*(writer(ch) for ch in range(1, 9)))
    assert len({tid for ids in results for tid in ids}) == 80
    for channel, ids in enumerate(results, start=1):
        assert [t.id for t in await memory.turns.history(channel)] == ids
        assert [t.id for t in await memory.turns.recent(channel)] == ids[:5:-1]


# ---- durability -------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from bot.memory import Memory

    async def main():
        memory = await Memory.open(sys.argv[1])
        print("ready", flush=True)
        for i in range(1_000_000):
            tid = await memory.turns.add(
                1, "user" if i % 2 == 0 else "assistant", f"burst {i} " + "x" * (i % 300),
                name="Ann", message_id=10_000 + i, extra_message_ids=[20_000_000 + i], tokens=i,
            )
            print(tid, i, flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
async def test_killed_writer_loses_nothing_committed(tmp_path: Path):
    path = tmp_path / "burst.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER, encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    reported: list[tuple[int, int]] = []
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline = time.monotonic() + 60
        while len(reported) < 300 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            tid, i = map(int, line.split())
            reported.append((tid, i))
        assert proc.poll() is None  # still writing: the kill lands mid-burst
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # what it printed before dying was committed too
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n") and len(line.split()) == 2:
                reported.append(tuple(map(int, line.split())))  # type: ignore[arg-type]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(reported) >= 300

    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    mem = await Memory.open(path)
    try:
        stored = {t.id: t for t in await mem.turns.history(1)}
        for tid, i in reported:
            turn = stored[tid]
            assert turn.content == f"burst {i} " + "x" * (i % 300)
            assert (turn.message_id, turn.tokens) == (10_000 + i, i)
            assert (await mem.turns.for_message(20_000_000 + i)).id == tid
        # nothing half-written: every stored turn is complete and ids have no holes
        assert sorted(stored) == list(range(1, len(stored) + 1))
        assert len(stored) >= len(reported)
        check = await (await mem.db.execute("PRAGMA integrity_check")).fetchone()
        assert check[0] == "ok"
        assert await mem.turns.add(1, "user", "life goes on") == len(stored) + 1
    finally:
        await mem.close()


async def test_scenes_migration_from_v2_keeps_everything_and_adds_scenes_and_swipes(
    tmp_path: Path,
):
    """The scenes/swipes migration (v5 in the merged order) needs only the v1/v2 tables."""
    path = tmp_path / "v2.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0])
    con.executescript(MIGRATIONS[1])
    con.execute("PRAGMA user_version=2")
    con.execute(
        "INSERT INTO turns (channel_id, name, role, persona, content, created_at) "
        "VALUES (5, 'Grumbold', 'assistant', 'Grumbold', 'Hmph.', 1.0)"
    )
    con.execute("INSERT INTO guilds (guild_id, default_persona) VALUES (3, 'Sable')")
    con.commit()
    con.close()
    mem = await Memory.open(path)
    try:
        assert user_version(path) == SCHEMA_VERSION
        assert {"scenes", "scene_members", "swipes", "swipe_turns"} <= tables(path)
        (turn,) = await mem.turns.history(5)
        assert (turn.persona, turn.content) == ("Grumbold", "Hmph.")
        assert (await mem.places.guild(3)).default_persona == "Sable"
        await mem.scenes.add_member(5, 3, "Grumbold", nicknames=["Grum"])
        await mem.scenes.add_member(5, 3, "Sable", talkativeness=0.2)
        scene = await mem.scenes.get(5)
        assert [(m.name, m.seat, m.nicknames, m.talkativeness) for m in scene.members] == [
            ("Grumbold", 0, ["Grum"], None),
            ("Sable", 1, [], 0.2),
        ]
        await mem.swipes.start(turn.id, "Hmph.", 2, reply_to=None, requester=7)
        assert await mem.swipes.add(turn.id, "Bah.", 2) == 1
        assert (await mem.turns.get(turn.id)).content == "Bah."  # the one shown is the one kept
        assert await mem.swipes.show(turn.id, 0) == "Hmph."
        state = await mem.swipes.get(turn.id)
        assert (state.shown, state.alternatives, state.requester) == (0, ["Hmph.", "Bah."], 7)
        await mem.turns.delete(turn.id)  # alternatives go with their turn
        assert await mem.swipes.get(turn.id) is None
        assert await mem.scenes.clear(5) == 2
        assert (await mem.scenes.get(5)).members == []
    finally:
        await mem.close()


async def build_at(path: Path, version: int) -> None:
    """A file as a bot of schema `version` left it: `MIGRATIONS[:version]`, then that number."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        for step in MIGRATIONS[:version]:
            if callable(step):
                await step(db)
            else:
                await db.executescript(step)
        await db.execute(f"PRAGMA user_version = {version}")
    finally:
        await db.close()


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_every_earlier_version_migrates_and_every_store_works(tmp_path: Path, version: int):
    """A file of each earlier version keeps its turns and channel rows, reaches SCHEMA_VERSION,
    and then serves every store: owed replies, recall, places, personas, webhooks, scenes,
    swipes, notes, summaries, members' cards and audit."""
    path = tmp_path / f"v{version}.db"
    await build_at(path, version)
    con = sqlite3.connect(path)
    con.execute(
        "INSERT INTO turns (channel_id, guild_id, message_id, name, role, content, created_at) "
        "VALUES (4, 3, 400, 'Ann', 'user', 'the lighthouse keeper waved', 1.0)"
    )
    con.execute("INSERT INTO turn_messages VALUES (400, 1)")
    con.execute("INSERT INTO channels (channel_id, guild_id, mode) VALUES (4, 3, 'always')")
    con.commit()
    con.close()
    assert user_version(path) == version

    mem = await Memory.open(path)
    try:
        assert user_version(path) == SCHEMA_VERSION
        (old,) = await mem.turns.history(4)
        assert (old.id, old.content, old.message_id) == (1, "the lighthouse keeper waved", 400)
        assert (await mem.places.channel(4)).mode == "always"
        assert not await mem.owed.awaiting()  # turns stored before v4 are owed nothing
        owed = await mem.turns.add(4, "user", "lighthouse again?", guild_id=3, awaiting=True)
        assert [t.id for t in await mem.owed.awaiting()] == [owed]
        reply = await mem.turns.add(4, "assistant", "yes", guild_id=3, answers=owed)
        assert not await mem.owed.awaiting()
        if mem.fts:  # the index covers the old turn as well as the new ones
            found = [t.id for t, _ in await mem.turns.search(4, "lighthouse")]
            assert sorted(found) == [old.id, owed]
        await mem.places.update_guild(3, default_persona="Sable")
        assert (await mem.places.guild(3)).default_persona == "Sable"
        await mem.personas.save(3, "Sable", "{}", created_by=9)
        assert (await mem.personas.get(3, "sable")).name == "Sable"
        await mem.webhooks.save(4, 77, "token")
        assert await mem.webhooks.get(4) == (77, "token")
        await mem.scenes.add_member(4, 3, "Sable")
        assert [m.name for m in (await mem.scenes.get(4)).members] == ["Sable"]
        await mem.swipes.start(reply, "yes", None, reply_to=owed, requester=9)
        assert await mem.swipes.add(reply, "indeed", None) == 1
        assert await mem.notes.add(4, "the party is level 5", guild_id=3, author_id=9) == 1
        assert [n.text for n in await mem.notes.list(4)] == ["the party is level 5"]
        await mem.summaries.put(4, "They talked of lighthouses.", old.id, owed)
        assert (await mem.summaries.get(4)).last_id == owed
        await mem.member_cards.set(3, 9, "a keeper")
        assert await mem.member_cards.of(3, [9, 10]) == {9: "a keeper"}
        await mem.audit.write(9, "test", guild_id=3, old=None, new={"ok": True})
        assert [(r.action, r.new) for r in await mem.audit.latest(3)] == [("test", '{"ok": true}')]
    finally:
        await mem.close()


async def test_threads_mode_migration_keeps_channel_rows_and_accepts_every_mode(tmp_path: Path):
    """The version that added `threads` rebuilt `channels` (a CHECK cannot be altered): rows of
    the version before it survive whole, every mode of `bot.policy.MODES` is accepted after it,
    and a mode outside the list is still refused by the file itself."""
    from bot.policy import MODES
    from bot.store.db import threads_mode

    version = MIGRATIONS.index(threads_mode)  # the file as the version before it left it
    path = tmp_path / "before_threads.db"
    await build_at(path, version)
    con = sqlite3.connect(path)
    con.execute(
        "INSERT INTO channels (channel_id, guild_id, mode, persona, forget_before, settings) "
        "VALUES (4, 3, 'always', 'Sable', 7, '{\"temperature\": 0.2}')"
    )
    con.commit()
    con.close()
    mem = await Memory.open(path)
    try:
        kept = await mem.places.channel(4)
        assert (kept.mode, kept.persona, kept.forget_before, kept.settings) == (
            "always", "Sable", 7, {"temperature": 0.2}
        )  # fmt: skip
        for i, mode in enumerate(MODES):
            await mem.places.update_channel(10 + i, 3, mode=mode)
            assert (await mem.places.channel(10 + i)).mode == mode
    finally:
        await mem.close()
    con = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO channels (channel_id, mode) VALUES (99, 'sometimes')")
    finally:
        con.close()
