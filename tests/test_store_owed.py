"""Owed replies on a real SQLite file: stored owed, settled exactly once, and the reads catch-up
makes at start."""

from __future__ import annotations

import asyncio

from bot.memory import Memory


async def test_an_owed_reply_settles_once(memory: Memory):
    first = await memory.turns.add(1, "user", "q1", awaiting=True)
    second = await memory.turns.add(2, "user", "q2", awaiting=True)
    await memory.turns.add(1, "user", "just talk")  # not owed anything
    assert [t.id for t in await memory.owed.awaiting()] == [first, second]  # oldest first
    assert await memory.owed.is_awaiting(first) and await memory.owed.is_awaiting(second)
    # many callers race to settle the same reply: exactly one wins
    wins = await asyncio.gather(*(memory.owed.mark_answered(first) for _ in range(8)))
    assert sorted(wins) == [False] * 7 + [True]
    assert not await memory.owed.is_awaiting(first)
    assert [t.id for t in await memory.owed.awaiting()] == [second]
    # the bot's reply stored with `answers=` settles it in the same transaction
    await memory.turns.add(2, "assistant", "a2", answers=second)
    assert await memory.owed.awaiting() == []
    assert await memory.owed.mark_answered(second) is False
    assert await memory.owed.is_awaiting(10_000) is False


async def test_catch_up_reads(memory: Memory):
    assert await memory.owed.newest_message_id(5) is None
    assert await memory.owed.known_channels() == []
    await memory.turns.add(5, "user", "a", message_id=50)
    reply = await memory.turns.add(5, "assistant", "b", message_id=52, extra_message_ids=[53])
    await memory.turns.add(7, "user", "c", guild_id=2, message_id=70)
    await memory.places.update_channel(9, 3, mode="off")  # settings, no turns
    assert await memory.owed.newest_message_id(5) == 53  # a split reply's last chunk
    await memory.turns.link_messages(reply, [54])
    assert await memory.owed.newest_message_id(5) == 54
    assert await memory.owed.newest_message_id(5, window=0) is None
    assert await memory.owed.known_channels() == [(5, None), (7, 2), (9, 3)]


async def test_recent_speakers_are_the_server_members_to_look_for_in_dms(memory: Memory):
    """Newest first, each once, at most `limit`; not the bot, not those who DMed lately."""
    assert await memory.owed.recent_speakers(10) == []
    for author in (11, 12, 13, 11):
        await memory.turns.add(5, "user", "hi", guild_id=2, author_id=author)
    await memory.turns.add(5, "assistant", "hello", guild_id=2)
    await memory.turns.add(6, "user", "psst", author_id=13)  # a DM: read as a known channel
    assert await memory.owed.recent_speakers(10) == [11, 12]
    assert await memory.owed.recent_speakers(1) == [11]
    # only the newest turns are looked at: 13's DM and 11's last message
    assert await memory.owed.recent_speakers(10, scan=2) == [11]
