"""The turn store on a real SQLite file: round trip, order, paging, forgetting, Discord edits and
deletes, split replies, the index behind newest-first reads, export and the reads replies use."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import pytest

from bot.memory import Memory
from bot.prompt import Turn
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


async def test_get_last_assistant_and_who_spoke_after(memory: Memory):
    question = await memory.turns.add(2, "user", "q", name="Ann")
    reply = await memory.turns.add(2, "assistant", "a", name="bot")
    await memory.turns.add(3, "user", "elsewhere")
    assert (await memory.turns.get(reply)).content == "a"
    assert await memory.turns.get(10_000) is None
    assert (await memory.turns.last_assistant(2)).id == reply
    assert await memory.turns.last_assistant(3) is None
    assert await memory.turns.user_spoke_after(2, question) is False  # the other channel's
    later = await memory.turns.add(2, "user", "and another thing")
    assert await memory.turns.user_spoke_after(2, reply) is True
    assert await memory.turns.user_spoke_after(2, later) is False


async def test_export_marks_forgotten_turns(memory: Memory):
    old = await add_many(memory, 8, 2)
    await memory.turns.forget(8)
    new = await memory.turns.add(8, "user", "fresh", name="Bob", message_id=42, tokens=1)
    count, data = await memory.export_jsonl(8)
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert count == len(rows) == 3 and data.endswith(b"\n")
    assert [(r["id"], r["forgotten"]) for r in rows] == [
        (old[0], True),
        (old[1], True),
        (new, False),
    ]
    # every stored field of each turn but `hidden` (hidden turns are not exported at all),
    # and whether forget hid it
    turns = await memory.turns.history(8)
    fields = [{**dataclasses.asdict(t), "forgotten": t.id in old} for t in turns]
    assert rows == [{k: v for k, v in f.items() if k != "hidden"} for f in fields]
    assert await memory.export_jsonl(9) == (0, b"")  # an empty channel: an empty file


async def test_a_hidden_turn_is_kept_but_left_out_of_reads_search_and_export(memory: Memory):
    ask = await memory.turns.add(12, "user", "the dragon hoards teacups", name="Ann")
    reply = await memory.turns.add(12, "assistant", "teacups, of course", stopped=True)
    later = await memory.turns.add(12, "user", "ok", name="Ann")
    assert (await memory.turns.get(reply)).stopped is True  # type: ignore[union-attr]
    assert await memory.turns.mark(reply, hidden=True) is True
    assert await memory.turns.mark(10**9, hidden=True) is False  # no such turn
    assert [t.id for t in await memory.turns.history(12)] == [ask, reply, later]  # kept
    assert [t.id for t in await memory.turns.recent(12)] == [later, ask]
    assert await memory.turns.last_assistant(12) is None
    if memory.fts:
        hits = await memory.turns.search(12, "teacups")
        assert [(t.id, before) for t, before in hits] == [(ask, None)]
    count, data = await memory.export_jsonl(12)
    rows = [json.loads(line) for line in data.decode().splitlines()]
    assert count == 2 and [r["id"] for r in rows] == [ask, later]
    # a hidden member's line does not count as someone speaking after a reply
    await memory.turns.mark(reply, hidden=False, stopped=False)
    await memory.turns.mark(later, hidden=True)
    assert await memory.turns.user_spoke_after(12, reply) is False
    assert (await memory.turns.last_assistant(12)).stopped is False  # type: ignore[union-attr]
