"""Channel and server rows and access on a real SQLite file."""

from __future__ import annotations

import pytest

from bot.memory import Memory
from bot.store.places import ChannelState, GuildState


async def test_channel_rows(memory: Memory):
    assert await memory.places.channel(1) == ChannelState(1)  # nothing stored: all inherited
    await memory.places.update_channel(1, 10, mode="always", settings={"temperature": 0.5})
    await memory.places.update_channel(1, persona="Sable")  # the guild id stays
    state = await memory.places.channel(1)
    assert (state.guild_id, state.mode, state.persona) == (10, "always", "Sable")
    assert state.settings == {"temperature": 0.5}
    await memory.places.update_channel(1, mode=None, settings={})  # back to inheriting
    state = await memory.places.channel(1)
    assert (state.mode, state.persona, state.settings) == (None, "Sable", {})
    with pytest.raises(ValueError, match="forget_before"):
        await memory.places.update_channel(1, forget_before=3)
    assert (await memory.places.channel(1)).forget_before == 0


async def test_guild_rows(memory: Memory):
    assert await memory.places.guild(5) == GuildState(5)
    await memory.places.update_guild(
        5,
        imports_allowed=False,
        reset_allowed=True,
        channel_allowlist=[7, 8],
        settings={"top_k": 3},
    )
    await memory.places.update_guild(5, default_persona="Grumbold")
    assert await memory.places.guild(5) == GuildState(
        5, {"top_k": 3}, "Grumbold", False, True, [7, 8]
    )
    assert await memory.places.guild(6) == GuildState(6)  # another server is untouched
    with pytest.raises(ValueError, match="owner"):
        await memory.places.update_guild(5, owner=1)


async def test_blocking(memory: Memory):
    assert await memory.places.blocked(1) == (set(), set())
    assert await memory.places.set_blocked(1, "user", 100, True) is True
    assert await memory.places.set_blocked(1, "user", 100, True) is False  # already blocked
    assert await memory.places.set_blocked(1, "role", 200, True) is True
    assert await memory.places.set_blocked(2, "user", 300, True) is True
    assert await memory.places.blocked(1) == ({100}, {200})
    assert await memory.places.blocked_users(1) == {100}
    assert await memory.places.blocked_users(None) == set()  # outside a server: nobody
    assert await memory.places.set_blocked(1, "user", 100, False) is True
    assert await memory.places.set_blocked(1, "user", 100, False) is False
    assert await memory.places.blocked(1) == (set(), {200})
    assert await memory.places.blocked_users(2) == {300}
