"""Memory: turns round-trip, order, forgetting, Discord edits/deletes, migrations, durability."""

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

import pytest

from bot.memory import Memory
from bot.prompt import Turn
from bot.store.db import MIGRATIONS, SCHEMA_VERSION, UnusableDatabaseError
from bot.store.turns import PAGE, StoredTurn


async def add_many(memory: Memory, channel: int, n: int, **kw) -> list[int]:
    ids = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        ids.append(await memory.turns.add(channel, role, f"message {i}", name="Ann", **kw))
    return ids


async def test_round_trip(memory: Memory):
    tid = await memory.turns.add(
        42,
        "user",
        "hello **world** 🎉\nsecond line",
        name="Ann",
        guild_id=7,
        message_id=1001,
        author_id=99,
        persona="pirate",
        tokens=12,
        created_at=1700000000.5,
    )
    (turn,) = await memory.turns.recent(42)
    assert turn == StoredTurn(
        tid,
        42,
        7,
        1001,
        99,
        "Ann",
        "user",
        "pirate",
        "hello **world** 🎉\nsecond line",
        12,
        1700000000.5,
    )
    assert turn.to_turn() == Turn("user", "hello **world** 🎉\nsecond line", "Ann", 12, tid)
    assert await memory.turns.for_message(1001) == turn
    assert await memory.turns.message_ids(tid) == [1001]
    assert await memory.turns.history(42) == [turn]
    stats = await memory.turns.stats(42)
    assert (stats.turns, stats.tokens, stats.oldest) == (1, 12, 1700000000.5)


async def test_role_is_checked(memory: Memory):
    with pytest.raises(sqlite3.IntegrityError):
        await memory.turns.add(1, "system", "not a role")
    assert await memory.turns.recent(1) == []  # the failed transaction left nothing behind
    assert await memory.turns.add(1, "user", "still usable") > 0


async def test_newest_first_across_pages_and_channels(memory: Memory):
    n = PAGE * 2 + 17
    a, b = [], []
    for i in range(n):
        a.append(await memory.turns.add(1, "user", f"a{i}", tokens=3))
        if i % 10 == 0:
            b.append(await memory.turns.add(2, "assistant", f"b{i}"))
    got = await memory.turns.recent(1)
    assert [t.id for t in got] == a[::-1]  # every page, newest first, no gaps or repeats
    assert [t.id for t in await memory.turns.recent(2)] == b[::-1]
    assert [t.id for t in await memory.turns.recent(1, limit=5)] == a[::-1][:5]
    assert [t.id for t in await memory.turns.recent(1, limit=PAGE + 3)] == a[::-1][: PAGE + 3]
    assert [t.id for t in await memory.turns.history(1)] == a


async def test_token_budget_stops_reading_early(memory: Memory):
    ids = [await memory.turns.add(5, "user", f"m{i}", tokens=10) for i in range(PAGE * 3)]
    got = await memory.turns.recent(5, token_budget=100)
    assert 0 < len(got) < len(ids)
    assert [t.id for t in got] == ids[::-1][: len(got)]  # a newest-first prefix
    assert sum(t.tokens + 8 for t in got) >= 100  # ...that covers the budget


async def test_forget_and_unforget(memory: Memory):
    old = await add_many(memory, 3, 4)
    assert await memory.turns.unforget(3) is False  # nothing to undo yet
    assert await memory.turns.forget(3) == old[-1]
    assert await memory.turns.recent(3) == []
    assert (await memory.turns.stats(3)).turns == 0
    new = await memory.turns.add(3, "user", "after forget")
    assert [t.id for t in await memory.turns.recent(3)] == [new]
    assert await memory.turns.last_assistant(3) is None  # the old reply is forgotten too
    assert [t.id for t in await memory.turns.recent(3, include_forgotten=True)] == [
        new,
        *old[::-1],
    ]
    assert len(await memory.turns.history(3)) == 5  # nothing was deleted
    assert await memory.turns.unforget(3) is True
    assert [t.id for t in await memory.turns.recent(3)] == [new, *old[::-1]]
    assert (await memory.turns.last_assistant(3)).id == old[-1]
    assert await memory.turns.unforget(3) is False  # one level of undo


async def test_forget_twice_undoes_only_the_last(memory: Memory):
    first = await add_many(memory, 4, 2)
    await memory.turns.forget(4)
    second = await add_many(memory, 4, 2)
    await memory.turns.forget(4)
    assert await memory.turns.recent(4) == []
    assert await memory.turns.unforget(4)
    assert [t.id for t in await memory.turns.recent(4)] == second[::-1]
    assert first[-1] < second[0]


async def test_clear_channel_deletes_and_resets_watermark(memory: Memory):
    await add_many(memory, 6, 3)
    await add_many(memory, 7, 2)
    await memory.turns.forget(6)
    assert await memory.turns.clear(6) == 3
    assert await memory.turns.history(6) == []
    assert (await memory.places.channel(6)).forget_before == 0
    assert len(await memory.turns.recent(7)) == 2


async def test_edit_by_message_id(memory: Memory):
    tid = await memory.turns.add(1, "user", "teh typo", message_id=500, tokens=3)
    assert await memory.turns.edit_message(500, "the typo, fixed", tokens=5)
    (turn,) = await memory.turns.recent(1)
    assert (turn.id, turn.content, turn.tokens) == (tid, "the typo, fixed", 5)
    assert await memory.turns.edit_message(501, "unknown message") is False


async def test_delete_by_message_id(memory: Memory):
    keep = await memory.turns.add(1, "user", "keep", message_id=600)
    await memory.turns.add(1, "user", "remove me", message_id=601)
    assert await memory.turns.delete_message(601)
    assert [t.id for t in await memory.turns.recent(1)] == [keep]
    assert await memory.turns.for_message(601) is None
    assert await memory.turns.delete_message(601) is False


@pytest.mark.parametrize("deleted", [700, 701, 702, 703])
async def test_multi_message_turn_goes_whole(memory: Memory, deleted: int):
    before = await memory.turns.add(9, "user", "question", message_id=699)
    reply = await memory.turns.add(
        9, "assistant", "a very long reply in chunks", message_id=700, extra_message_ids=[701, 702]
    )
    await memory.turns.link_messages(reply, [703])  # a chunk sent later
    assert await memory.turns.message_ids(reply) == [700, 701, 702, 703]
    for mid in (700, 701, 702, 703):
        assert (await memory.turns.for_message(mid)).id == reply
    # editing any chunk edits the turn
    assert await memory.turns.edit_message(702, "edited reply")
    assert (await memory.turns.for_message(700)).content == "edited reply"

    assert await memory.turns.delete_message(deleted)
    assert [t.id for t in await memory.turns.recent(9)] == [before]
    for mid in (700, 701, 702, 703):
        assert await memory.turns.for_message(mid) is None
    assert await memory.turns.message_ids(reply) == []  # the links went with the turn


async def test_update_turn_attaches_message(memory: Memory):
    tid = await memory.turns.add(1, "assistant", "streaming…")
    await memory.turns.update(tid, "final text", 4, message_id=800)
    turn = await memory.turns.for_message(800)
    assert (turn.id, turn.content, turn.tokens, turn.message_id) == (tid, "final text", 4, 800)


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


async def test_recent_turns_reads_through_the_index(memory: Memory):
    for ch in range(3):
        for i in range(50):
            await memory.turns.add(ch, "user", f"m{i}", tokens=1)
    await memory.turns.forget(1)
    for i in range(PAGE + 10):  # more than one page after the watermark
        await memory.turns.add(1, "user", f"after the watermark {i}")
    # SQLite's own trace hook reports each statement as run, its parameters bound in
    seen: list[str] = []
    await memory.db.set_trace_callback(seen.append)
    try:
        await memory.turns.recent(1, limit=PAGE + 5)
        await memory.turns.recent(0, token_budget=10)
    finally:
        await memory.db.set_trace_callback(None)
    queries = [sql for sql in seen if "FROM turns" in sql]
    assert len(queries) >= 3, seen  # two pages of channel 1, at least one of channel 0
    assert any(" AND id < " in sql for sql in queries)  # the second page's query is checked too
    for sql in queries:
        cur = await memory.db.execute(f"EXPLAIN QUERY PLAN {sql}")
        plan = " | ".join(row[-1] for row in await cur.fetchall())
        assert "SCAN turns" not in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # the order comes from the index, not a sort
        assert (
            "USING INDEX turns_by_channel" in plan
            or "USING INTEGER PRIMARY KEY" in plan
            or ("USING COVERING INDEX" in plan)
        ), plan


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
