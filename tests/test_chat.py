"""Chatting with the real HermesBot through the protocol-level fake Discord."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from bot.conversation import EMPTY_NOTICE
from bot.engine import EngineError
from cogs.chat import APOLOGY, BUSY
from tests.bot_harness import ScriptedEngine, bot_settings, running_bot
from tests.fake_discord import FakeDiscord, FakeUser
from tests.world import World

pytestmark = pytest.mark.slow


def bot_messages(fake: FakeDiscord, channel_id: int) -> list:
    return [m for m in fake.channel_messages(channel_id) if m.author.id == fake.bot_user.id]


async def mention(
    w: World, text: str, *, channel: int | None = None, author: FakeUser | None = None
):
    bot = w.fake.bot_user
    return await w.fake.user_message(
        channel or w.general.id, author or w.alice, f"{bot.mention} {text}"
    )


async def test_mention_gets_a_streamed_reply_stored_in_memory(
    world: World, tiny_model: Path, tmp_path: Path
) -> None:
    settings = bot_settings(tmp_path, tiny_model, MAX_NEW_TOKENS="24")
    async with running_bot(world.fake, settings) as bot:
        asked = await mention(world, "hello there")
        await world.fake.wait_for(lambda: bot_messages(world.fake, world.general.id))
        await world.fake.wait_for(lambda: bot.conv.pending == 0)
        reply = bot_messages(world.fake, world.general.id)[0]
        assert reply.reference_id == asked.id  # a reply to the author...
        creates = world.fake.find_requests("POST", f"/channels/{world.general.id}/messages")
        assert creates[0].json["allowed_mentions"]["replied_user"] is False  # ...without a ping
        assert world.fake.typing[world.general.id] >= 1
        turns = await bot.memory.turns.history(world.general.id)
        assert [t.role for t in turns] == ["user", "assistant"]
        assert turns[0].content == "hello there" and turns[0].name == "alice"
        assert turns[1].content == reply.content
        assert await bot.memory.turns.message_ids(turns[1].id) == [reply.id]


async def test_stream_edits_the_reply_as_it_grows(world: World, tmp_path: Path) -> None:
    text = "One. " * 60
    engine = ScriptedEngine([text], delay=0.02, piece=20)
    settings = bot_settings(tmp_path, "scripted", STREAM_INTERVAL="0.05")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        await mention(world, "count")
        await world.fake.wait_for(lambda: bot_messages(world.fake, world.general.id))
        await world.fake.wait_for(lambda: bot.conv.pending == 0)
        reply = bot_messages(world.fake, world.general.id)[0]
        assert reply.content == text.strip()
        edits = world.fake.find_requests(
            "PATCH", f"/channels/{world.general.id}/messages/{reply.id}"
        )
        assert len(edits) >= 2
        assert all(
            e.json["allowed_mentions"] == {"parse": [], "replied_user": False}
            or e.json["allowed_mentions"].get("parse") == []
            for e in edits
        )


async def test_always_mode_dm_and_reply_chain(
    world: World, tiny_model: Path, tmp_path: Path
) -> None:
    fake = world.fake
    quiet = fake.add_channel(world.guild.id, "quiet")
    settings = bot_settings(tmp_path, tiny_model)
    async with running_bot(fake, settings) as bot:
        await bot.memory.places.update_channel(world.general.id, world.guild.id, mode="always")
        await fake.user_message(world.general.id, world.alice, "no mention needed")
        await fake.wait_for(lambda: bot_messages(fake, world.general.id))

        # mention mode (default): a plain message is stored but not answered
        await fake.user_message(quiet.id, world.bob, "just chatting")
        dm = fake.dm_channel(world.alice)
        await fake.user_message(dm.id, world.alice, "hi in private")
        await fake.wait_for(lambda: bot_messages(fake, dm.id))
        assert not bot_messages(fake, quiet.id)
        assert [t.content for t in await bot.memory.turns.history(quiet.id)] == ["just chatting"]

        # a reply to the bot's message is answered without a mention
        first = bot_messages(fake, dm.id)[0]
        await fake.wait_for(lambda: bot.conv.pending == 0)
        await fake.user_message(quiet.id, world.bob, "anyone?")
        await fake.user_message(dm.id, world.alice, "and another thing", reply_to=first)
        await fake.wait_for(lambda: len(bot_messages(fake, dm.id)) == 2)
        assert not bot_messages(fake, quiet.id)

        # threads inherit their parent's mode
        thread = fake.add_thread(world.general.id, "side chat")
        await fake.user_message(thread.id, world.bob, "thread message")
        await fake.wait_for(lambda: bot_messages(fake, thread.id))

        # off: nothing stored, nothing answered (proven by a later message, sent after it,
        # being answered first)
        await bot.memory.places.update_channel(quiet.id, world.guild.id, mode="off")
        await mention(world, "are you there?", channel=quiet.id)
        answered = len(bot_messages(fake, world.general.id))
        await fake.user_message(world.general.id, world.alice, "sent after it")
        await fake.wait_for(
            lambda: len(bot_messages(fake, world.general.id)) > answered and bot.conv.pending == 0
        )
        assert len(await bot.memory.turns.history(quiet.id)) == 2
        assert not bot_messages(fake, quiet.id)


async def test_long_output_is_split_with_balanced_fences(world: World, tmp_path: Path) -> None:
    code = "\n".join(f"    print('line {i}')  # keep going" for i in range(90))
    prose = " ".join(f"Sentence number {i} explains the code." for i in range(40))
    text = f"{prose}\n\n```python\n{code}\n```\n\n{prose}\n\n{prose}"
    assert len(text) > 5000
    engine = ScriptedEngine([text], piece=500)
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await mention(world, "write a lot")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        messages = bot_messages(world.fake, world.general.id)
        assert len(messages) >= 3
        for m in messages:
            assert len(m.content) <= 2000
            assert len(re.findall(r"^```", m.content, re.MULTILINE)) % 2 == 0, m.content[-80:]
        joined = "".join(m.content for m in messages)
        assert joined.count("print('line 89')") == 1 and "Sentence number 39" in joined
        stored = await bot.memory.turns.history(world.general.id)
        assert stored[-1].content == text.strip()
        assert await bot.memory.turns.message_ids(stored[-1].id) == sorted(m.id for m in messages)


async def test_output_pings_nobody(world: World, tmp_path: Path) -> None:
    role = world.fake.add_role(world.guild.id, "mods", mentionable=True)
    text = f"Hey @everyone and @here, <@{world.bob.id}> and <@&{role.id}> look!"
    engine = ScriptedEngine([text])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await mention(world, "ping them")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        reply = bot_messages(world.fake, world.general.id)[0]
        assert reply.content == text  # shown as written...
        assert not reply.mention_everyone and reply.mentions == [] and reply.mention_roles == []
        sends = [
            r
            for r in world.fake.requests
            if r.method in ("POST", "PATCH")
            and "/messages" in r.path
            and r.json
            and "content" in r.json
        ]
        assert sends
        for request in sends:  # ...and no send or edit may ping anyone
            am = request.json["allowed_mentions"]
            assert am.get("parse") == [] and not am.get("users") and not am.get("roles")
            # a reply never pings its author; an edit cannot ping anyone
            assert (
                am.get("replied_user") is (False if request.method == "POST" else None)
                or am.get("replied_user") is False
            )


async def test_many_channels_at_once_answered_in_order(world: World, tmp_path: Path) -> None:
    fake = world.fake

    def answer(prompt: str) -> str:
        asked = re.findall(r"alice: (msg \d+-\d+)", prompt)[-1]
        return f"answer to {asked}"

    engine = ScriptedEngine(answer, delay=0.001)
    channels = [fake.add_channel(world.guild.id, f"room-{i}") for i in range(20)]
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        for c in channels:
            await bot.memory.places.update_channel(c.id, world.guild.id, mode="always")
        await asyncio.gather(
            *(
                fake.user_message(c.id, world.alice, f"msg {i}-{j}")
                for j in range(5)
                for i, c in enumerate(channels)
            )
        )
        await fake.wait_for(
            lambda: sum(len(bot_messages(fake, c.id)) for c in channels) == 100, timeout=60
        )
        for i, c in enumerate(channels):
            got = [m.content for m in bot_messages(fake, c.id)]
            assert got == [f"answer to msg {i}-{j}" for j in range(5)]


async def test_full_queue_says_busy(world: World, tmp_path: Path) -> None:
    gate = asyncio.Event()  # the first reply stays in progress until the busy notice is out
    engine = ScriptedEngine(["slow answer"], gate=gate)
    other = world.fake.add_channel(world.guild.id, "other")
    settings = bot_settings(tmp_path, "x", QUEUE_SIZE="1")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        await mention(world, "first")
        await world.fake.wait_for(lambda: bot.conv.pending == 1)
        await mention(world, "second", channel=other.id, author=world.bob)
        await world.fake.wait_for(lambda: bot_messages(world.fake, other.id))
        assert bot_messages(world.fake, other.id)[0].content == BUSY
        assert bot.conv.pending == 1  # the first reply is still in progress: it made "second" busy
        gate.set()
        await world.fake.wait_for(lambda: bot.conv.pending == 0)
        assert bot_messages(world.fake, world.general.id)[0].content == "slow answer"
        # the busy message was stored (so the context is complete), the bot's notice was not
        assert [t.role for t in await bot.memory.turns.history(other.id)] == ["user"]
        assert len(engine.prompts) == 1  # "second" never reached the engine


async def test_gateway_drop_mid_reply_delivers_once(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["part one, " * 10 + "the end"], delay=0.05, piece=10)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0.05")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        await mention(world, "tell me")
        await world.fake.wait_for(lambda: bot_messages(world.fake, world.general.id))
        await world.fake.disconnect_gateway(resumable=True)
        await mention(world, "sent while disconnected", author=world.bob)
        await world.fake.wait_for(lambda: world.fake.resume_count >= 1)
        await world.fake.wait_for(
            lambda: len(bot_messages(world.fake, world.general.id)) == 2 and bot.conv.pending == 0,
        )
        # a message after the replayed one: once it is answered, the replay has been handled
        await mention(world, "and one more", author=world.carol)
        await world.fake.wait_for(
            lambda: len(bot_messages(world.fake, world.general.id)) == 3 and bot.conv.pending == 0,
        )
        replies = bot_messages(world.fake, world.general.id)
        assert len(replies) == 3 and replies[0].content.endswith("the end")
        assert len(engine.prompts) == 3  # the replayed message was answered exactly once
        users = [t for t in await bot.memory.turns.history(world.general.id) if t.role == "user"]
        assert len(users) == 3


async def test_rate_limited_edit_is_retried(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["alpha beta gamma delta " * 5], delay=0.05, piece=15)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        injection = world.fake.inject(
            "PATCH", "/channels/{channel_id}/messages/{message_id}", 429, retry_after=0.05, times=1
        )
        await mention(world, "go")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        assert injection.remaining == 0  # the 429 happened...
        reply = bot_messages(world.fake, world.general.id)[0]
        assert reply.content == ("alpha beta gamma delta " * 5).strip()  # ...and was retried


async def test_engine_failure_apologises_and_keeps_serving(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine([EngineError("boom"), "I am fine now"])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await mention(world, "first")
        await world.fake.wait_for(lambda: bot_messages(world.fake, world.general.id))
        assert bot_messages(world.fake, world.general.id)[0].content == APOLOGY
        await mention(world, "second")
        await world.fake.wait_for(
            lambda: len(bot_messages(world.fake, world.general.id)) == 2 and bot.conv.pending == 0,
        )
        assert bot_messages(world.fake, world.general.id)[1].content == "I am fine now"
        roles = [t.role for t in await bot.memory.turns.history(world.general.id)]
        assert roles == ["user", "user", "assistant"]


async def test_empty_output_gets_a_retry_then_a_notice(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["   ", "### Instruction: nothing"])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await mention(world, "say nothing")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        assert len(engine.prompts) == 2
        assert bot_messages(world.fake, world.general.id)[0].content == EMPTY_NOTICE
        assert [t.role for t in await bot.memory.turns.history(world.general.id)] == ["user"]


async def test_edit_and_delete_follow_into_memory(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["ok"])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        note = await world.fake.user_message(world.general.id, world.bob, "I like tea")
        other = await world.fake.user_message(world.general.id, world.bob, "delete me")
        await world.fake.wait_for(lambda: len(world.fake.dispatched) >= 2)
        await world.fake.edit_user_message(note, "I like coffee")
        await world.fake.delete_message(other)
        await mention(world, "what does bob like?")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        prompt = engine.prompts[-1]
        assert "bob: I like coffee" in prompt and "tea" not in prompt and "delete me" not in prompt


async def test_history_survives_a_restart(world: World, tmp_path: Path) -> None:
    settings = bot_settings(tmp_path, "x")
    first = ScriptedEngine(["Nice to meet you, Alice."])
    async with running_bot(world.fake, settings, engine=first) as bot:
        await mention(world, "my name is Alice")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
    second = ScriptedEngine(["You are Alice."])
    async with running_bot(world.fake, settings, engine=second) as bot:
        await mention(world, "what is my name?")
        await world.fake.wait_for(lambda: len(bot_messages(world.fake, world.general.id)) == 2)
    prompt = second.prompts[-1]
    assert "alice: my name is Alice" in prompt
    assert "### Response:\nNice to meet you, Alice.\n\n" in prompt
    assert prompt.endswith("alice: what is my name?\n\n### Response:\n")


async def test_server_error_on_send_is_retried(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["delivered despite a 500"])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        injection = world.fake.inject("POST", "/channels/{channel_id}/messages", 500, times=1)
        await mention(world, "hello")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        assert injection.remaining == 0
        assert [m.content for m in bot_messages(world.fake, world.general.id)] == [
            "delivered despite a 500"
        ]
        assert [t.role for t in await bot.memory.turns.history(world.general.id)] == [
            "user",
            "assistant",
        ]


async def test_dev_guild_gets_commands_instantly(world: World, tmp_path: Path) -> None:
    settings = bot_settings(tmp_path, "x", DEV_GUILD_ID=str(world.guild.id))
    async with running_bot(world.fake, settings, engine=ScriptedEngine(["hi"])):
        names = {c["name"] for c in world.fake.commands(world.guild.id)}
        assert {"admin", "persona", "reset", "regenerate", "continue"} <= names


async def test_blocked_user_is_ignored_and_not_stored(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["hello"])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await bot.memory.places.set_blocked(world.guild.id, "user", world.bob.id, True)
        await mention(world, "let me in", author=world.bob)
        await mention(world, "me too")
        # alice's message came after bob's: once she is answered, bob's has been handled
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        assert len(bot_messages(world.fake, world.general.id)) == 1
        turns = await bot.memory.turns.history(world.general.id)
        assert [t.name for t in turns if t.role == "user"] == ["alice"]


async def test_metrics_endpoint_counts_replies(world: World, tmp_path: Path) -> None:
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = ScriptedEngine(["one two three"])
    settings = bot_settings(tmp_path, "x", METRICS_PORT=str(port))
    async with running_bot(world.fake, settings, engine=engine) as bot:
        await mention(world, "count me")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as r,
        ):
            text = await r.text()
    assert re.search(r'^hermes_replies_total\{.*reason="eos".*\} 1\.0$', text, re.MULTILINE), text[
        :2000
    ]
    assert "hermes_time_to_first_token_seconds_count 1.0" in text


async def test_cooldown_stops_floods_but_keeps_context(world: World, tmp_path: Path) -> None:
    engine = ScriptedEngine(["first answer", "second answer"])
    settings = bot_settings(tmp_path, "x", USER_COOLDOWN="60")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        await mention(world, "one")
        await world.fake.wait_for(
            lambda: bot.conv.pending == 0 and bot_messages(world.fake, world.general.id)
        )
        flood = await mention(world, "two")
        await world.fake.wait_for(lambda: flood.reactions.get("⏳"))
        assert fake_bot_id(world) in flood.reactions["⏳"]
        await mention(world, "three", author=world.bob)  # others are not held back
        await world.fake.wait_for(
            lambda: len(bot_messages(world.fake, world.general.id)) == 2 and bot.conv.pending == 0,
        )
        assert len(engine.prompts) == 2 and "alice: two" in engine.prompts[-1]
        users = [
            t.content for t in await bot.memory.turns.history(world.general.id) if t.role == "user"
        ]
        assert users == ["one", "two", "three"]


def fake_bot_id(w: World) -> int:
    return w.fake.bot_user.id
