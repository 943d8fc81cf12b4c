"""/admin and the user commands (/reset, /regenerate, /continue) through the fake Discord.

Every command goes through the fake's slash-command dispatch into the real HermesBot; what a
command changed is read back from the bot's database and from what the engine was asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bot.engine import Engine, EngineError, GenerationParams, LocalEngine, make_engine
from cogs.chat import APOLOGY
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import (
    PATIENCE,
    FakeDiscord,
    FakeMessage,
    FakeUser,
)
from tests.world import World

pytestmark = pytest.mark.slow

MANAGE_GUILD = 1 << 5


# ---- helpers ------------------------------------------------------------------------------


@dataclass
class Reply:
    handle: Any
    text: str
    ephemeral: bool
    files: list


async def command(
    w: World,
    user: FakeUser,
    name: str,
    options: dict[str, Any] | None = None,
    *,
    channel: int | None = None,
    timeout: float = PATIENCE,
) -> Reply:
    """Invoke a slash command and wait for its answer (the follow-up when it deferred)."""
    handle = await w.fake.invoke_command(channel or w.general.id, user, name, options or {})
    response = await handle.wait_response(timeout)
    if response.type == 5:  # deferred ("thinking"): the first follow-up replaces it
        message = await handle.wait_message(timeout)
        return Reply(handle, message.content, message.ephemeral, message.attachments)
    return Reply(handle, response.content or "", response.ephemeral, response.files)


def bot_messages(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    return [m for m in fake.channel_messages(channel_id) if m.author.id == fake.bot_user.id]


async def mention(
    w: World, text: str, *, channel: int | None = None, author: FakeUser | None = None
):
    return await w.fake.user_message(
        channel or w.general.id, author or w.alice, f"{w.fake.bot_user.mention} {text}"
    )


async def settle(
    w: World, bot: Any, channel_id: int, count: int, timeout: float = PATIENCE
) -> None:
    """Wait until `channel_id` shows `count` bot messages and no reply is pending."""
    await w.fake.wait_for(
        lambda: len(bot_messages(w.fake, channel_id)) >= count and bot.conv.pending == 0,
        timeout=timeout,
    )


async def snapshot(bot: Any) -> dict[str, list]:
    """Every row of every table the admin commands can touch."""
    out = {}
    for table in ("turns", "turn_messages", "channels", "guilds", "access", "audit", "personas"):
        cur = await bot.memory.db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        out[table] = [tuple(r) for r in await cur.fetchall()]
    return out


async def audit_rows(bot: Any, w: World) -> list:
    return list(reversed(await bot.memory.audit.latest(w.guild.id, 200)))


async def stored(bot: Any, message: FakeMessage, timeout: float = PATIENCE) -> None:
    """Wait until the bot has stored `message` as a turn."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await bot.memory.turns.for_message(message.id) is None:
        assert asyncio.get_running_loop().time() < deadline, f"{message.content!r} not stored"
        await asyncio.sleep(0.02)


async def used(
    w: World, bot: Any, engine: ScriptedEngine, text: str, count: int, *, channel: int | None = None
) -> tuple[float, int, int]:
    """Mention the bot with `text`, wait for its `count`th reply there, and return the
    (temperature, top_k, max_new_tokens) that reply was generated with."""
    await mention(w, text, channel=channel)
    await settle(w, bot, channel or w.general.id, count)
    params = engine.params[-1]
    return params.temperature, params.top_k, params.max_new_tokens


def button(message: FakeMessage, label: str) -> str:
    for row in message.components:
        for comp in row.get("components") or []:
            if comp.get("label") == label:
                return comp["custom_id"]
    raise LookupError(f"no button {label!r} on {message.components}")


# ---- permissions ---------------------------------------------------------------------------


def admin_calls(w: World) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("admin channel", {"mode": "off"}),
        ("admin channel", {"mode": "always", "channel": w.other}),
        ("admin settings show", {}),
        ("admin settings set", {"name": "temperature", "value": "0.5", "scope": "server"}),
        ("admin settings set", {"name": "top_k", "value": "5", "scope": "channel"}),
        ("admin settings reset", {"scope": "channel"}),
        ("admin memory forget", {}),
        ("admin memory unforget", {}),
        ("admin memory clear", {}),
        ("admin memory stats", {}),
        ("admin memory export", {}),
        ("admin persona default", {"name": "Grumbold"}),
        ("admin persona imports", {"rule": "deny"}),
        ("admin access block", {"target": w.bob}),
        ("admin access block", {"target": w.muted}),
        ("admin access unblock", {"target": w.carol}),
        ("admin access channels", {"action": "add", "channel": w.other}),
        ("admin access channels", {"action": "clear"}),
        ("admin access reset", {"rule": "allow"}),
        ("admin model status", {}),
        ("admin model reload", {}),
        ("admin audit", {}),
    ]


async def test_admin_is_for_managers_and_owners_only(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(["noted"])
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        # the registered definition: hidden from non-managers by default, never in DMs
        (admin,) = [c for c in w.fake.commands() if c["name"] == "admin"]
        assert str(admin["default_member_permissions"]) == str(MANAGE_GUILD) == "32"
        assert admin["dm_permission"] is False
        assert admin["contexts"] in (None, [0])
        # ...and the user commands are open to everyone
        for name in ("reset", "regenerate", "continue"):
            (cmd,) = [c for c in w.fake.commands() if c["name"] == name]
            assert cmd["default_member_permissions"] is None

        # some state for the refused commands to (not) change
        await mention(w, "remember the password is swordfish")
        await settle(w, bot, w.general.id, 1)
        await command(w, w.admin, "admin memory forget")
        await stored(bot, await w.fake.user_message(w.general.id, w.bob, "after the forget"))
        await bot.memory.places.set_blocked(w.guild.id, "user", w.carol.id, True)
        before = await snapshot(bot)
        assert before["turns"] and before["audit"] and before["channels"]

        # a member without Manage Server is refused everything, ephemerally, and nothing changes
        for name, options in admin_calls(w):
            got = await command(w, w.alice, name, options)
            assert got.ephemeral, name
            assert "Manage Server" in got.text, (name, got.text)
            assert not got.handle.response.components, name  # e.g. no clear confirm button
        # a read-only command answered after all of them: they left nothing behind
        shown = await command(w, w.admin, "admin settings show")
        assert shown.ephemeral and "temperature" in shown.text
        assert await snapshot(bot) == before
        assert len(engine.prompts) == 1  # no reload, no generation either

        # a bot owner (OWNER_IDS) without Manage Server is allowed, and audited as themself
        got = await command(
            w, w.owner, "admin settings set", {"name": "top_p", "value": "0.5", "scope": "server"}
        )
        assert got.ephemeral and "top_p" in got.text and "0.5" in got.text
        assert (await bot.memory.places.guild(w.guild.id)).settings == {"top_p": 0.5}
        row = (await audit_rows(bot, w))[-1]
        assert (row.user_id, row.action, row.new) == (
            w.owner.id,
            "settings.set server top_p",
            "0.5",
        )


# ---- channel mode ----------------------------------------------------------------------------


async def test_channel_mode_here_or_on_a_chosen_channel_threads_inherit(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "heard you")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        got = await command(w, w.admin, "admin channel", {"mode": "always", "channel": w.other})
        assert got.ephemeral and w.other.mention in got.text and "always" in got.text
        assert (await bot.memory.places.channel(w.other.id)).mode == "always"
        assert (await bot.memory.places.channel(w.general.id)).mode is None  # not where it was run

        await w.fake.user_message(w.other.id, w.bob, "no mention needed here")
        await settle(w, bot, w.other.id, 1)
        thread = w.fake.add_thread(w.other.id, "side chat")
        await w.fake.user_message(thread.id, w.bob, "threads follow their parent")
        await settle(w, bot, thread.id, 1)

        got = await command(w, w.admin, "admin channel", {"mode": "off"})  # this channel
        assert w.general.mention in got.text and "off" in got.text
        await mention(w, "are you there?")
        await w.fake.user_message(w.other.id, w.bob, "still on over here")
        await settle(w, bot, w.other.id, 2)
        # back on: the next message here is answered first, and alone; the one sent while the
        # channel was off was neither stored nor answered (it would be ahead in the queue)
        await command(w, w.admin, "admin channel", {"mode": "mention"})
        back = await mention(w, "and now?")
        await settle(w, bot, w.general.id, 1)
        (reply,) = bot_messages(w.fake, w.general.id)
        assert reply.reference_id == back.id
        turns = await bot.memory.turns.history(w.general.id)
        assert [t.role for t in turns] == ["user", "assistant"]  # off: not even stored
        assert "and now?" in turns[0].content

        rows = [r for r in await audit_rows(bot, w) if r.action == "channel.mode"]
        assert [(r.user_id, r.channel_id, r.old, r.new) for r in rows] == [
            (w.admin.id, w.other.id, None, "always"),
            (w.admin.id, w.general.id, None, "off"),
            (w.admin.id, w.general.id, "off", "mention"),
        ]


# ---- generation settings -----------------------------------------------------------------


async def test_settings_set_show_reset_sources_ranges_and_restart(
    world: World, tmp_path: Path
) -> None:
    w = world
    settings = w.settings(tmp_path, TEMPERATURE="0.3", TOP_K="40")
    engine = ScriptedEngine(lambda prompt: "ok")
    async with running_bot(w.fake, settings, engine=engine) as bot:
        for name, value, scope in [
            ("temperature", "0.5", "server"),
            ("top_k", "10", "server"),
            ("temperature", "0.9", "channel"),
            ("max_new_tokens", "64", "channel"),
        ]:
            got = await command(
                w, w.admin, "admin settings set", {"name": name, "value": value, "scope": scope}
            )
            assert got.ephemeral and f"`{name}` is now" in got.text, got.text

        # out of range, or not a number of the right kind: refused, naming the range; no change
        before = await snapshot(bot)
        for name, value, allowed in [
            ("temperature", "5.5", "between 0 and 5"),
            ("top_p", "1.5", "between 0 and 1"),
            ("top_k", "-1", "between 0 and 1000"),
            ("top_k", "2.5", "from 0 to 1000"),
            ("repetition_penalty", "0.4", "between 0.5 and 3"),
            ("max_new_tokens", "100000", "between 1 and 8192"),
            ("context_tokens", "12", "between 256 and 131072"),
            ("temperature", "warm", "from 0 to 5"),
            ("temperature", "nan", "between 0 and 5"),
        ]:
            for scope in ("server", "channel"):
                got = await command(
                    w, w.admin, "admin settings set", {"name": name, "value": value, "scope": scope}
                )
                assert got.ephemeral and "Not changed" in got.text, got.text
                assert allowed in got.text, got.text
        assert await snapshot(bot) == before

        # show: the value in force and where it comes from, here and in another channel
        got = await command(w, w.admin, "admin settings show")
        assert got.ephemeral
        lines = got.text.splitlines()
        assert "`temperature` = **0.9** (channel)" in lines
        assert "`top_k` = **10** (server)" in lines
        assert "`max_new_tokens` = **64** (channel)" in lines
        assert "`top_p` = **0.9** (default)" in lines
        got = await command(w, w.admin, "admin settings show", {"channel": w.other})
        assert w.other.mention in got.text
        assert "`temperature` = **0.5** (server)" in got.text.splitlines()
        assert "`max_new_tokens` = **12** (default)" in got.text.splitlines()

        # the settings reach the engine: channel over server over default
        assert await used(w, bot, engine, "here", 1) == (0.9, 10, 64)
        assert await used(w, bot, engine, "there", 1, channel=w.other.id) == (0.5, 10, 12)

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("settings.")]
        assert [(r.user_id, r.action, r.channel_id, r.old, r.new) for r in rows] == [
            (w.admin.id, "settings.set server temperature", w.general.id, None, "0.5"),
            (w.admin.id, "settings.set server top_k", w.general.id, None, "10"),
            (w.admin.id, "settings.set channel temperature", w.general.id, None, "0.9"),
            (w.admin.id, "settings.set channel max_new_tokens", w.general.id, None, "64"),
        ]

    # a restart on the same database keeps all of it
    engine = ScriptedEngine(lambda prompt: "ok again")
    async with running_bot(w.fake, settings, engine=engine) as bot:
        got = await command(w, w.admin, "admin settings show")
        assert "`temperature` = **0.9** (channel)" in got.text.splitlines()
        assert "`top_k` = **10** (server)" in got.text.splitlines()
        assert await used(w, bot, engine, "after the restart", 2) == (0.9, 10, 64)

        # reset: the channel falls back to the server, then the server to the defaults
        got = await command(w, w.admin, "admin settings reset", {"scope": "channel"})
        assert got.ephemeral and "defaults" in got.text
        got = await command(w, w.admin, "admin settings show")
        assert "`temperature` = **0.5** (server)" in got.text.splitlines()
        await command(w, w.admin, "admin settings reset", {"scope": "server"})
        got = await command(w, w.admin, "admin settings show")
        assert "`temperature` = **0.3** (default)" in got.text.splitlines()
        assert "`top_k` = **40** (default)" in got.text.splitlines()
        assert await used(w, bot, engine, "defaults now", 3) == (0.3, 40, 12)

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("settings.reset")]
        assert [(r.action, json.loads(r.old), json.loads(r.new)) for r in rows] == [
            ("settings.reset channel", {"temperature": 0.9, "max_new_tokens": 64}, {}),
            ("settings.reset server", {"temperature": 0.5, "top_k": 10}, {}),
        ]


# ---- memory ------------------------------------------------------------------------------


async def test_forget_unforget_and_clear_change_the_next_prompt(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Got it.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await mention(w, "my fruit is apple")
        await settle(w, bot, w.general.id, 1)

        got = await command(w, w.admin, "admin memory forget")
        assert got.ephemeral and "unforget" in got.text
        await mention(w, "my fruit is banana")
        await settle(w, bot, w.general.id, 2)
        assert "banana" in engine.prompts[-1] and "apple" not in engine.prompts[-1]
        assert len(await bot.memory.turns.history(w.general.id)) == 4  # hidden, not deleted

        got = await command(w, w.admin, "admin memory unforget")
        assert "Restored" in got.text
        await mention(w, "my fruit is cherry")
        await settle(w, bot, w.general.id, 3)
        prompt = engine.prompts[-1]
        assert prompt.index("apple") < prompt.index("banana") < prompt.index("cherry")
        got = await command(w, w.admin, "admin memory unforget")
        assert "no forget to undo" in got.text

        # clear asks first (counting forgotten turns too: they go as well)...
        await command(w, w.admin, "admin memory forget")
        assert (await bot.memory.turns.stats(w.general.id)).turns == 0
        stored = await bot.memory.turns.history(w.general.id)
        assert len(stored) == 6
        asked = await command(w, w.admin, "admin memory clear")
        assert asked.ephemeral and "6 stored turns" in asked.text
        prompt_msg = asked.handle.original
        # ...and only the invoker's button counts: another admin is refused, nothing goes
        refused = await w.fake.click_button(
            prompt_msg, button(prompt_msg, "Delete the stored turns"), w.admin2
        )
        response = await refused.wait_response()
        assert response.ephemeral and "Only the admin who asked" in response.content
        # the invoker's Cancel, clicked after, still finds the question open: the refused
        # click settled nothing
        cancel = await w.fake.click_button(prompt_msg, button(prompt_msg, "Cancel"), w.admin)
        await cancel.wait_response()
        await w.fake.wait_for(lambda: "Cancelled" in prompt_msg.content)
        assert prompt_msg.components == []
        assert await bot.memory.turns.history(w.general.id) == stored

        asked = await command(w, w.admin, "admin memory clear")
        prompt_msg = asked.handle.original
        confirm = await w.fake.click_button(
            prompt_msg, button(prompt_msg, "Delete the stored turns"), w.admin
        )
        await confirm.wait_response()
        await w.fake.wait_for(lambda: "Deleted 6 turns" in prompt_msg.content)
        assert await bot.memory.turns.history(w.general.id) == []
        assert (await bot.memory.places.channel(w.general.id)).forget_before == 0

        await mention(w, "what was my fruit?")
        await settle(w, bot, w.general.id, 4)
        prompt = engine.prompts[-1]
        assert "what was my fruit?" in prompt
        assert not any(f in prompt for f in ("apple", "banana", "cherry"))

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("memory.")]
        assert [(r.user_id, r.action, r.channel_id) for r in rows] == [
            (w.admin.id, "memory.forget", w.general.id),
            (w.admin.id, "memory.unforget", w.general.id),
            (w.admin.id, "memory.forget", w.general.id),
            (w.admin.id, "memory.clear", w.general.id),
        ]
        forget, unforget, _, clear = rows
        assert (forget.old, unforget.new) == ("0", "0") and int(forget.new) > 0
        assert unforget.old == forget.new and (clear.old, clear.new) == ("6", "0")


async def test_memory_stats_export_and_an_unanswered_clear(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(["First reply.", "Second reply, with ünïcode ✓."])
    settings = w.settings(tmp_path, CONFIRM_TIMEOUT="1")
    async with running_bot(w.fake, settings, engine=engine) as bot:
        got = await command(w, w.admin, "admin memory stats")
        assert got.ephemeral and got.text.startswith("0 turns, 0 tokens") and "never" in got.text
        await mention(w, "hello")
        await settle(w, bot, w.general.id, 1)
        await mention(w, "and again", author=w.bob)
        await settle(w, bot, w.general.id, 2)

        turns = await bot.memory.turns.history(w.general.id)
        assert len(turns) == 4
        got = await command(w, w.admin, "admin memory stats")
        tokens = sum(t.tokens for t in turns)
        assert got.text.startswith(f"4 turns, {tokens} tokens")
        assert f"oldest <t:{int(turns[0].created_at)}:R>" in got.text
        assert f"newest <t:{int(turns[-1].created_at)}:R>" in got.text

        got = await command(w, w.admin, "admin memory export")
        assert got.ephemeral and got.text == "4 turns."
        (attachment,) = got.files
        assert attachment.filename == f"memory-{w.general.id}.jsonl"
        rows = [json.loads(line) for line in attachment.data.decode().splitlines()]
        # every stored field of each turn but `hidden` (hidden ones are left out), and
        # whether forget hid it
        fields = [{**dataclasses.asdict(t), "forgotten": False} for t in turns]
        assert rows == [{k: v for k, v in f.items() if k != "hidden"} for f in fields]
        assert {r["channel_id"] for r in rows} == {w.general.id}
        assert [r["content"] for r in rows] == [
            "hello",
            "First reply.",
            "and again",
            "Second reply, with ünïcode ✓.",
        ]
        # after a forget the export still holds every turn, marked for training to leave out
        await command(w, w.admin, "admin memory forget")
        got = await command(w, w.admin, "admin memory export")
        rows = [json.loads(line) for line in got.files[0].data.decode().splitlines()]
        assert [r["forgotten"] for r in rows] == [True] * 4

        # a clear whose confirm never comes closes after CONFIRM_TIMEOUT into nothing
        assert bot.settings.confirm_timeout == 1.0
        asked = await command(w, w.admin, "admin memory clear")
        assert "Delete the stored turns" in str(asked.handle.original.components)
        await w.fake.wait_for(lambda: "Timed out" in asked.handle.original.content)
        assert asked.handle.original.components == []  # no button left to press
        assert await bot.memory.turns.history(w.general.id) == turns

        actions = [(r.user_id, r.action, r.new) for r in await audit_rows(bot, w)]
        assert actions == [
            (w.admin.id, "memory.stats", None),
            (w.admin.id, "memory.stats", None),
            (w.admin.id, "memory.export", "4"),
            (w.admin.id, "memory.forget", str(turns[-1].id)),
            (w.admin.id, "memory.export", "4"),
        ]


# ---- personas ----------------------------------------------------------------------------


async def test_persona_default_and_imports_rule(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Hrmph. Greetings.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        got = await command(w, w.admin, "admin persona default", {"name": "grumbold"})
        assert got.ephemeral and "**Grumbold**" in got.text
        assert (await bot.memory.places.guild(w.guild.id)).default_persona == "Grumbold"

        before = await snapshot(bot)
        got = await command(w, w.admin, "admin persona default", {"name": "Nobody At All"})
        assert got.ephemeral and "no persona called 'Nobody At All'" in got.text
        assert await snapshot(bot) == before

        # channels without their own persona now speak as Grumbold
        await mention(w, "who are you?")
        await w.fake.wait_for(
            lambda: bot.conv.pending == 0 and len(w.fake.channel_messages(w.general.id)) >= 2,
        )
        assert "Grumbold" in engine.prompts[-1]
        (turn,) = [t for t in await bot.memory.turns.history(w.general.id) if t.role == "assistant"]
        assert turn.persona == "Grumbold"

        assert (await bot.memory.places.guild(w.guild.id)).imports_allowed is True
        got = await command(w, w.admin, "admin persona imports", {"rule": "deny"})
        assert got.ephemeral and "may not" in got.text
        assert (await bot.memory.places.guild(w.guild.id)).imports_allowed is False
        got = await command(w, w.admin, "admin persona imports", {"rule": "allow"})
        assert (await bot.memory.places.guild(w.guild.id)).imports_allowed is True

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("persona.")]
        assert [(r.user_id, r.action, r.old, r.new) for r in rows] == [
            (w.admin.id, "persona.default", None, "Grumbold"),
            (w.admin.id, "persona.imports", "true", "false"),
            (w.admin.id, "persona.imports", "false", "true"),
        ]


# ---- access ------------------------------------------------------------------------------


async def test_access_block_users_and_roles_and_channel_allow_list(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "hello")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        got = await command(w, w.admin, "admin access block", {"target": w.bob})
        assert got.ephemeral and f"<@{w.bob.id}> is now blocked" in got.text
        got = await command(w, w.admin, "admin access block", {"target": w.muted})
        assert f"<@&{w.muted.id}> is now blocked" in got.text
        assert await bot.memory.places.blocked(w.guild.id) == ({w.bob.id}, {w.muted.id})
        got = await command(w, w.admin, "admin access block", {"target": w.bob})
        assert "already blocked" in got.text

        # blocked users and members with a blocked role: no answer, nothing stored
        await mention(w, "let me in", author=w.bob)
        await mention(w, "me too", author=w.carol)
        await mention(w, "hi", author=w.alice)
        await settle(w, bot, w.general.id, 1)
        got = await command(w, w.admin, "admin access unblock", {"target": w.bob})
        assert f"<@{w.bob.id}> is now allowed" in got.text
        back = await mention(w, "am I back?", author=w.bob)
        await settle(w, bot, w.general.id, 2)
        assert "bob: am I back?" in engine.prompts[-1]
        # the channel's replies go in order: had a blocked message been taken, its reply
        # would have come before this one
        replies = bot_messages(w.fake, w.general.id)
        assert len(replies) == 2 and replies[-1].reference_id == back.id
        assert len(engine.prompts) == 2
        users = [t for t in await bot.memory.turns.history(w.general.id) if t.role == "user"]
        assert [t.author_id for t in users] == [w.alice.id, w.bob.id]
        assert "let me in" not in engine.prompts[-1] and "me too" not in engine.prompts[-1]

        # an allow-list of channels keeps the bot out of every other channel
        got = await command(
            w, w.admin, "admin access channels", {"action": "add", "channel": w.other}
        )
        assert got.ephemeral and got.text == f"The bot serves: {w.other.mention}."
        assert (await bot.memory.places.guild(w.guild.id)).channel_allowlist == [w.other.id]
        await mention(w, "ignored here")
        await mention(w, "answered there", channel=w.other.id)
        await settle(w, bot, w.other.id, 1)
        thread = w.fake.add_thread(w.other.id, "inside the allowed channel")
        await mention(w, "threads of it too", channel=thread.id)
        await settle(w, bot, thread.id, 1)
        got = await command(w, w.admin, "admin access channels", {"action": "show"})
        assert got.text == f"The bot serves: {w.other.mention}."
        got = await command(w, w.admin, "admin access channels", {"action": "clear"})
        assert "all channels" in got.text
        again = await mention(w, "back in general")
        await settle(w, bot, w.general.id, 3)
        # answered next, in order: the message sent while general was left out got nothing
        replies = bot_messages(w.fake, w.general.id)
        assert len(replies) == 3 and replies[-1].reference_id == again.id
        assert "ignored here" not in engine.prompts[-1]
        stored_texts = [t.content for t in await bot.memory.turns.history(w.general.id)]
        assert not any("ignored here" in text for text in stored_texts)

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("access.")]
        assert [(r.user_id, r.action, r.old, r.new) for r in rows] == [
            (w.admin.id, f"access.block user {w.bob.id}", "false", "true"),
            (w.admin.id, f"access.block role {w.muted.id}", "false", "true"),
            (w.admin.id, f"access.block user {w.bob.id}", "true", "true"),
            (w.admin.id, f"access.unblock user {w.bob.id}", "true", "false"),
            (w.admin.id, "access.channels add", "[]", f"[{w.other.id}]"),
            (w.admin.id, "access.channels clear", f"[{w.other.id}]", "[]"),
        ]
        assert {r.channel_id for r in rows} == {w.general.id}


# ---- model status and audit ----------------------------------------------------------------


async def test_model_status_reports_model_queue_speed_and_uptime(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "a fairly long answer " * 4, piece=8)
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        got = await command(w, w.admin, "admin model status")
        assert got.ephemeral and "recent: no replies yet" in got.text
        await mention(w, "talk to me")
        await settle(w, bot, w.general.id, 1)
        bot.started_at -= 3723  # an hour, two minutes and three seconds ago

        got = await command(w, w.admin, "admin model status")
        lines = got.text.splitlines()
        assert lines[0] == "**Model** `scripted` (scripted engine)"
        assert lines[1] == "dtype float32, quantization none, device cpu"
        assert lines[2].startswith("memory: ") and "GiB" in lines[2]
        assert lines[3] == "queue: 0 waiting in the engine, 0 replies pending"
        assert lines[4].startswith("recent: last 1 replies (medians): queue wait ")
        assert "first token" in lines[4] and "tokens/s" in lines[4] and "prompt" in lines[4]
        assert lines[5].startswith("uptime: 1h 2m ")
        row = (await audit_rows(bot, w))[-1]
        assert (row.user_id, row.action, row.channel_id) == (
            w.admin.id,
            "model.status",
            w.general.id,
        )


async def test_audit_lists_the_latest_actions_newest_first(world: World, tmp_path: Path) -> None:
    w = world
    async with running_bot(w.fake, w.settings(tmp_path), engine=ScriptedEngine(["x"])) as bot:
        got = await command(w, w.admin, "admin audit")
        assert got.ephemeral and got.text == "No admin actions recorded yet."
        await command(w, w.admin, "admin channel", {"mode": "always", "channel": w.other})
        await command(
            w, w.owner, "admin settings set", {"name": "top_k", "value": "7", "scope": "server"}
        )
        await command(w, w.admin2, "admin access reset", {"rule": "allow"})
        await command(w, w.admin, "admin persona imports", {"rule": "deny"})

        got = await command(w, w.admin, "admin audit", {"limit": 3})
        assert got.ephemeral
        lines = got.text.splitlines()
        assert len(lines) == 3
        assert f"<@{w.admin.id}> `persona.imports` in {w.general.mention}: true → false" in lines[0]
        assert f"<@{w.admin2.id}> `access.reset` in {w.general.mention}: false → true" in lines[1]
        assert lines[2].endswith(
            f"<@{w.owner.id}> `settings.set server top_k` in {w.general.mention}: unset → 7"
        )
        rows = list(reversed(await audit_rows(bot, w)))  # newest first, like the listing
        for line, row in zip(lines, rows, strict=False):
            assert line.startswith(f"<t:{int(row.created_at)}:f> <@{row.user_id}> ")
        got = await command(w, w.admin, "admin audit")
        lines = got.text.splitlines()
        assert len(lines) == 4
        assert lines[-1].endswith(
            f"<@{w.admin.id}> `channel.mode` in {w.other.mention}: unset → always"
        )


# ---- user commands -------------------------------------------------------------------------


async def test_regenerate_replaces_the_last_reply_and_continue_extends_it(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(
        [
            "The first answer.",
            EngineError("boom"),
            "A better answer",
            EngineError("tired"),
            "and even more.",
        ]
    )
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        got = await command(w, w.alice, "regenerate")
        assert got.ephemeral and "no reply here" in got.text
        got = await command(w, w.alice, "continue")
        assert got.ephemeral and "no reply here" in got.text
        await mention(w, "explain tides")
        await settle(w, bot, w.general.id, 1)
        (old,) = bot_messages(w.fake, w.general.id)
        assert old.content == "The first answer."
        stored = await bot.memory.turns.history(w.general.id)

        # a regenerate whose generation fails keeps the old reply, in Discord and in memory
        got = await command(w, w.alice, "regenerate")
        assert got.ephemeral and APOLOGY in got.text and "previous reply stays" in got.text
        assert not w.fake.get_message(old.id).deleted
        apology = bot_messages(w.fake, w.general.id)[-1]
        assert apology.content == APOLOGY
        await w.fake.delete_message(apology)
        turns = await bot.memory.turns.history(w.general.id)
        assert [(t.role, t.content) for t in turns] == [(t.role, t.content) for t in stored]
        assert await bot.memory.turns.message_ids(turns[1].id) == [old.id]

        got = await command(w, w.alice, "regenerate")
        assert got.ephemeral and got.text == "Regenerated."
        assert w.fake.get_message(old.id).deleted  # the old reply is gone from Discord...
        (new,) = bot_messages(w.fake, w.general.id)
        assert new.content == "A better answer"
        prompt = engine.prompts[-1]
        assert "alice: explain tides" in prompt and "The first answer." not in prompt
        assert prompt.endswith("### Response:\n")
        turns = await bot.memory.turns.history(w.general.id)  # ...and from memory: only the new one
        assert [(t.role, t.content) for t in turns] == [
            ("user", "explain tides"),
            ("assistant", "A better answer"),
        ]
        assert await bot.memory.turns.message_ids(turns[1].id) == [new.id]

        # a continue whose generation fails says so and changes nothing
        got = await command(w, w.alice, "continue")
        assert got.ephemeral and got.text == APOLOGY
        assert [m.content for m in bot_messages(w.fake, w.general.id)] == ["A better answer"]
        assert await bot.memory.turns.history(w.general.id) == turns

        got = await command(w, w.alice, "continue")
        assert got.ephemeral and got.text == "Continued."
        prompt = engine.prompts[-1]
        assert prompt.endswith("### Response:\nA better answer")  # the reply reopened
        messages = bot_messages(w.fake, w.general.id)
        assert [m.content for m in messages] == ["A better answer", "and even more."]
        turns = await bot.memory.turns.history(w.general.id)
        assert [(t.role, t.content) for t in turns] == [
            ("user", "explain tides"),
            ("assistant", "A better answer and even more."),
        ]
        assert await bot.memory.turns.message_ids(turns[1].id) == [m.id for m in messages]
        assert turns[1].tokens == engine.count_tokens("A better answer and even more.")

        # the grown reply is what the next prompt sees
        await mention(w, "thanks")
        await settle(w, bot, w.general.id, 3)
        assert "### Response:\nA better answer and even more.\n\n" in engine.prompts[-1]


async def test_reset_in_dms_always_in_servers_only_where_allowed(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "noted")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        dm = w.fake.dm_channel(w.alice)
        await w.fake.user_message(dm.id, w.alice, "my secret is 42")
        await settle(w, bot, dm.id, 1)
        got = await command(w, w.alice, "reset", channel=dm.id)
        assert got.ephemeral and "forgot" in got.text
        await w.fake.user_message(dm.id, w.alice, "what is my secret?")
        await settle(w, bot, dm.id, 2)
        assert "what is my secret?" in engine.prompts[-1] and "42" not in engine.prompts[-1]

        await mention(w, "the code word is heron")
        await settle(w, bot, w.general.id, 1)
        before = await snapshot(bot)
        got = await command(w, w.alice, "reset")
        assert got.ephemeral and "not allowed" in got.text
        assert await snapshot(bot) == before

        got = await command(w, w.admin, "admin access reset", {"rule": "allow"})
        assert got.ephemeral and (await bot.memory.places.guild(w.guild.id)).reset_allowed
        got = await command(w, w.alice, "reset")
        assert "forgot" in got.text
        await mention(w, "what is the code word?")
        await settle(w, bot, w.general.id, 2)
        assert "heron" not in engine.prompts[-1]

        await command(w, w.admin, "admin access reset", {"rule": "deny"})
        got = await command(w, w.bob, "reset")
        assert "not allowed" in got.text
        got = await command(w, w.admin, "reset")  # managers may, whatever the rule
        assert "forgot" in got.text

        # (old → new of a reset: the forget watermark, the last turn id it hides)
        top = max(t.id for t in await bot.memory.turns.history(w.general.id))
        rows = [r for r in await audit_rows(bot, w) if "reset" in r.action]
        assert [(r.user_id, r.action, r.channel_id, r.old) for r in rows] == [
            (w.admin.id, "access.reset", w.general.id, "false"),
            (w.alice.id, "reset", w.general.id, "0"),
            (w.admin.id, "access.reset", w.general.id, "true"),
            (w.admin.id, "reset", w.general.id, rows[1].new),
        ]
        assert [r.new for r in rows[2:]] == ["false", str(top)]
        assert 0 < int(rows[1].new) < top


# ---- model reload (real tiny models) -------------------------------------------------------


class HeldEngine(LocalEngine):
    """The real local engine, held at start until the test opens `gate`, recording the prompts
    it is given (a subclass the test hands the bot through its `engine_factory`)."""

    def __init__(self, model_path: str, loading: asyncio.Event, gate: asyncio.Event) -> None:
        super().__init__(model_path, dtype="float32", device_map="none")
        self.loading, self.gate = loading, gate
        self.prompts: list[str] = []

    async def start(self) -> None:
        self.loading.set()
        await asyncio.wait_for(self.gate.wait(), PATIENCE)
        await super().start()

    def generate(self, prompt: str, params: GenerationParams, *, cache_key: str | None = None):
        self.prompts.append(prompt)
        return super().generate(prompt, params, cache_key=cache_key)


async def test_model_reload_swaps_models_keeps_the_old_on_failure_and_drops_nothing(
    world: World, tiny_model: Path, tmp_path: Path
) -> None:
    from tests.tiny import make_model

    w = world
    second = make_model(tmp_path / "second-model", seed=1)
    missing = tmp_path / "no-such-model"
    settings = w.settings(tmp_path, tiny_model, MAX_NEW_TOKENS="6")
    loading, gate = asyncio.Event(), asyncio.Event()

    def engines(settings: Any, *, model: str | None = None) -> Engine:
        """The bot's own factory, except that the second model loads held at the gate."""
        if model == str(second):
            return HeldEngine(model, loading, gate)
        return make_engine(settings, model=model)

    async with running_bot(w.fake, settings, engine_factory=engines) as bot:
        first = bot.engine
        assert isinstance(first, LocalEngine) and first.info.model == str(tiny_model)

        # a local folder needs a bot owner, Manage Server is not enough
        got = await command(w, w.admin, "admin model reload", {"model": str(second)})
        assert got.ephemeral and "Only a bot owner" in got.text
        assert bot.engine is first and bot.conv.engine is first

        # a load that fails keeps the model that works, and says why
        got = await command(w, w.owner, "admin model reload", {"model": str(missing)})
        assert got.ephemeral
        assert got.text.startswith(f"Reload failed, still serving `{tiny_model}`: "), got.text
        assert "no-such-model" in got.text.split(": ", 1)[1]  # why: the path it could not load
        assert f"model folder not found: {missing}" in got.text  # at once, no hub retries
        assert bot.engine is first and bot.conv.engine is first
        await mention(w, "still there?")
        await settle(w, bot, w.general.id, 1)

        # a message that arrives while the new model loads is answered, not dropped
        reload = await w.fake.invoke_command(
            w.general.id, w.owner, "admin model reload", {"model": str(second)}
        )
        await w.fake.wait_for(loading.is_set)
        meanwhile = await mention(w, "are you reloading?", author=w.bob)
        await stored(bot, meanwhile)
        second_try = await command(w, w.owner, "admin model reload", {"model": str(second)})
        assert "already in progress" in second_try.text  # one reload at a time
        gate.set()
        done = await reload.wait_message(timeout=60)
        assert done.ephemeral and done.content.startswith(f"Now serving `{second}`"), done.content
        await w.fake.wait_for(
            lambda: any(m.reference_id == meanwhile.id for m in bot_messages(w.fake, w.general.id)),
        )

        new = bot.engine
        assert new is not first and bot.conv.engine is new
        assert isinstance(new, HeldEngine) and new.info.model == str(second)
        assert first._worker is None  # the old model was closed after its work ended

        # the next reply comes from the new engine
        await w.fake.wait_for(lambda: bot.conv.pending == 0)
        count = len(bot_messages(w.fake, w.general.id))
        await mention(w, "which model is this?")
        await settle(w, bot, w.general.id, count + 1)
        asked = new.prompts
        assert asked and asked[-1].endswith("alice: which model is this?\n\n### Response:\n")
        got = await command(w, w.admin, "admin model status")
        assert got.text.splitlines()[0] == f"**Model** `{second}` (local engine)"

        rows = [r for r in await audit_rows(bot, w) if r.action.startswith("model.reload")]
        assert [(r.user_id, r.action, r.old, r.new) for r in rows] == [
            (w.owner.id, "model.reload failed", str(tiny_model), str(missing)),
            (w.owner.id, "model.reload", str(tiny_model), str(second)),
        ]


async def test_two_regenerates_at_once_leave_one_reply(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(["original", "take two", "take three"], delay=0.05, piece=2)
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await mention(w, "say something")
        await settle(w, bot, w.general.id, 1)
        first = await w.fake.invoke_command(w.general.id, w.alice, "regenerate")
        second = await w.fake.invoke_command(w.general.id, w.bob, "regenerate")
        for handle in (first, second):
            done = await handle.wait_message()
            assert done.content == "Regenerated."
        await w.fake.wait_for(lambda: bot.conv.pending == 0)
        # the second regenerate replaced the first one's reply, not the long-gone original
        assert [m.content for m in bot_messages(w.fake, w.general.id)] == ["take three"]
        turns = await bot.memory.turns.history(w.general.id)
        assert [(t.role, t.content) for t in turns] == [
            ("user", "say something"),
            ("assistant", "take three"),
        ]


async def test_user_commands_follow_blocks_the_allow_list_and_mode_off(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "an answer")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await mention(w, "hello")
        await mention(w, "hello there", channel=w.other.id)
        await settle(w, bot, w.general.id, 1)
        await settle(w, bot, w.other.id, 1)
        await command(w, w.admin, "admin access reset", {"rule": "allow"})
        await command(w, w.admin, "admin access block", {"target": w.bob})
        await command(w, w.admin, "admin access block", {"target": w.muted})
        before = await snapshot(bot)
        calls = len(engine.prompts)

        for user in (w.bob, w.carol):  # a blocked user, a member with a blocked role
            for name in ("regenerate", "continue", "reset"):
                got = await command(w, user, name)
                assert got.ephemeral and "can't use my commands" in got.text, (name, got.text)
        assert await snapshot(bot) == before

        await command(w, w.admin, "admin access channels", {"action": "add"})  # general only
        before = await snapshot(bot)
        for name in ("regenerate", "continue", "reset"):
            got = await command(w, w.alice, name, channel=w.other.id)
            assert got.ephemeral and "not serving this channel" in got.text, (name, got.text)
        assert await snapshot(bot) == before
        await command(w, w.admin, "admin access channels", {"action": "clear"})

        await command(w, w.admin, "admin channel", {"mode": "off", "channel": w.other})
        before = await snapshot(bot)
        for name in ("regenerate", "continue"):
            got = await command(w, w.alice, name, channel=w.other.id)
            assert got.ephemeral and "switched off" in got.text, (name, got.text)
        assert await snapshot(bot) == before
        assert len(engine.prompts) == calls
        assert len(bot_messages(w.fake, w.other.id)) == 1

        # /continue only extends a reply that is still the latest message
        await stored(bot, await w.fake.user_message(w.general.id, w.alice, "wait, one more"))
        got = await command(w, w.alice, "continue")
        assert got.ephemeral and "no longer the latest message" in got.text
        assert len(engine.prompts) == calls
