"""The audit log on a real SQLite file."""

from __future__ import annotations

from bot.memory import Memory


async def test_audit_rows_newest_first_per_server(memory: Memory):
    await memory.audit.write(1, "channel.mode", guild_id=5, channel_id=6, old=None, new="always")
    await memory.audit.write(2, "settings.set", guild_id=5, old={"top_k": 3}, new=[1, "x"])
    await memory.audit.write(3, "elsewhere", guild_id=7)
    rows = await memory.audit.latest(5)
    assert [(r.user_id, r.action, r.channel_id, r.old, r.new) for r in rows] == [
        (2, "settings.set", None, '{"top_k": 3}', '[1, "x"]'),  # not text: stored as JSON
        (1, "channel.mode", 6, None, "always"),  # text as it is
    ]
    assert rows[0].id > rows[1].id
    assert [r.action for r in await memory.audit.latest(5, limit=1)] == ["settings.set"]
    assert [r.action for r in await memory.audit.latest(7)] == ["elsewhere"]
    assert await memory.audit.latest(None) == []
