"""Imported personas and the bot's webhooks on a real SQLite file."""

from __future__ import annotations

import sqlite3

import pytest

from bot.memory import Memory


async def test_personas_by_name_per_server(memory: Memory):
    first = await memory.personas.save(1, "Sable", '{"v": 1}', created_by=9, avatar=b"png")
    await memory.personas.save(1, "grumbold", "{}", created_by=9)
    await memory.personas.save(2, "Sable", "{}", created_by=8)  # the same name, another server
    stored = await memory.personas.get(1, "SABLE")  # names match whatever their case
    assert (stored.id, stored.name, stored.card, stored.avatar, stored.created_by) == (
        first,
        "Sable",
        '{"v": 1}',
        b"png",
        9,
    )
    assert [p.name for p in await memory.personas.in_guild(1)] == ["grumbold", "Sable"]
    assert [p.created_by for p in await memory.personas.in_guild(2)] == [8]
    with pytest.raises(sqlite3.IntegrityError):  # a taken name is refused without `replace`
        await memory.personas.save(1, "sable", "{}", created_by=7)
    # replacing keeps the row, its creator and (given none) its avatar
    assert await memory.personas.save(1, "sable", '{"v": 2}', created_by=7, replace=True)
    stored = await memory.personas.get(1, "Sable")
    assert (stored.id, stored.card, stored.avatar, stored.created_by) == (
        first,
        '{"v": 2}',
        b"png",
        9,
    )
    assert await memory.personas.delete(1, "SABLE") is True
    assert await memory.personas.delete(1, "Sable") is False
    assert await memory.personas.get(1, "Sable") is None
    assert await memory.personas.get(2, "Sable") is not None


async def test_webhooks(memory: Memory):
    assert await memory.webhooks.get(1) is None
    assert await memory.webhooks.ids() == set()
    await memory.webhooks.save(1, 11, "t1")
    await memory.webhooks.save(2, 22, "t2")
    await memory.webhooks.save(1, 33, "t3")  # remade: the channel's one webhook is the new one
    assert await memory.webhooks.get(1) == (33, "t3")
    assert await memory.webhooks.ids() == {22, 33}
    await memory.webhooks.forget(1)
    assert await memory.webhooks.get(1) is None
    assert await memory.webhooks.ids() == {22}
