"""Discord faults on the reply path (issue 11, holes 5 and 7), through the fake Discord.

The real HermesBot posts a streamed reply while the fake answers a send or an edit with a 503
(which discord.py does not retry), resets the connection under it, refuses edits for good, or
loses the message being replied to. Each time the member must end up seeing the whole reply,
stored once as the bot's turn, with no apology and no traceback in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from bot.discord.posting import split_message
from cogs.chat import APOLOGY
from tests.bot_harness import ScriptedEngine, bot_settings, running_bot
from tests.fake_discord import (
    EDIT_MESSAGE,
    EDIT_WEBHOOK_MESSAGE,
    EXECUTE_WEBHOOK,
    SEND_MESSAGE,
    FakeDiscord,
    FakeMessage,
)
from tests.world import World

pytestmark = pytest.mark.slow

TEXT = " ".join(f"word{i}" for i in range(60))


def bot_messages(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    return [m for m in fake.channel_messages(channel_id) if m.author.id == fake.bot_user.id]


async def ask(world: World, text: str = "tell me") -> FakeMessage:
    return await world.fake.user_message(
        world.general.id, world.alice, f"{world.fake.bot_user.mention} {text}"
    )


async def settle(world: World, bot, count: int = 1) -> list[FakeMessage]:
    fake = world.fake
    await fake.wait_for(
        lambda: (
            bot.conv.pending == 0
            and len(bot_messages(fake, world.general.id)) >= count
            and not bot.reply_tasks
        ),
    )
    return bot_messages(fake, world.general.id)


async def assert_stored_once(bot, world: World, messages: list[FakeMessage]) -> None:
    turns = await bot.memory.turns.history(world.general.id)
    assistant = [t for t in turns if t.role == "assistant"]
    assert len(assistant) == 1, [t.content for t in turns]
    assert assistant[0].content == TEXT
    assert await bot.memory.turns.message_ids(assistant[0].id) == sorted(m.id for m in messages)
    assert not await bot.memory.owed.awaiting()


def no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("fault", ["503", "reset", "close"])
async def test_failed_first_send_is_retried(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    engine = ScriptedEngine([TEXT])
    async with running_bot(world.fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        if fault == "503":
            injection = world.fake.inject(*SEND_MESSAGE, 503)
        else:
            injection = world.fake.inject(*SEND_MESSAGE, drop=fault)
        asked = await ask(world)
        messages = await settle(world, bot)
        assert injection.hits == 1  # the fault happened...
        assert [m.content for m in messages] == [TEXT]  # ...and the member got the whole reply
        assert messages[0].reference_id == asked.id
        await assert_stored_once(bot, world, messages)
    assert APOLOGY not in [m.content for m in bot_messages(world.fake, world.general.id)]
    no_traceback(caplog)


@pytest.mark.parametrize("fault", ["503", "reset"])
async def test_failed_edit_while_streaming_is_retried(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    engine = ScriptedEngine([TEXT], delay=0.01, piece=25)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        status = 503 if fault == "503" else 429
        drop = None if fault == "503" else "reset"
        injection = world.fake.inject(*EDIT_MESSAGE, status, after=1, drop=drop)
        await ask(world)
        messages = await settle(world, bot)
        assert injection.hits == 1
        assert [m.content for m in messages] == [TEXT]
        edits = world.fake.find_requests(*EDIT_MESSAGE)
        assert len(edits) >= 3  # it was streaming: edits before and after the fault
        await assert_stored_once(bot, world, messages)
    no_traceback(caplog)


async def test_reply_that_cannot_be_edited_finishes_in_a_new_message(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine([TEXT], delay=0.01, piece=25)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        # every edit after the first is refused for good (not worth retrying)
        refusal = {"message": "Missing Permissions", "code": 50013}
        injection = world.fake.inject(*EDIT_MESSAGE, 403, after=1, times=1000, body=refusal)
        await ask(world)
        messages = await settle(world, bot, count=2)
        assert injection.hits >= 1
        assert len(messages) == 2
        # the first message keeps what it showed; the second carries on from there
        assert TEXT.startswith(messages[0].content)
        assert TEXT in (messages[0].content + sep + messages[1].content for sep in ("", " "))
        await assert_stored_once(bot, world, messages)
    assert APOLOGY not in [m.content for m in bot_messages(world.fake, world.general.id)]
    no_traceback(caplog)


async def test_long_reply_with_faults_on_every_kind_of_call(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    long_text = " ".join(f"sentence{i} is here." for i in range(400))
    engine = ScriptedEngine([long_text], delay=0.005, piece=300)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0")
    async with running_bot(world.fake, settings, engine=engine) as bot:
        sends = world.fake.inject(*SEND_MESSAGE, 503, after=1, times=2)
        edits = world.fake.inject(*EDIT_MESSAGE, drop="reset", after=2, times=2)
        await ask(world)
        messages = await settle(world, bot, count=len(split_message(long_text)))
        assert sends.hits == 2 and edits.hits == 2
        assert [m.content for m in messages] == split_message(long_text)
        turns = [
            t for t in await bot.memory.turns.history(world.general.id) if t.role == "assistant"
        ]
        assert [t.content for t in turns] == [long_text]
        assert await bot.memory.turns.message_ids(turns[0].id) == sorted(m.id for m in messages)
    no_traceback(caplog)


async def test_reply_to_a_message_deleted_meanwhile_is_posted_quietly(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = world.fake
    engine = ScriptedEngine([TEXT])
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        holder: list[FakeMessage] = []
        hook = fake.on_request(*SEND_MESSAGE, lambda r: fake.delete_message(holder[0]))
        holder.append(await ask(world))
        messages = await settle(world, bot)
        assert hook.hits == 1 and holder[0].deleted
        assert [m.content for m in messages] == [TEXT]  # posted, no apology...
        assert messages[0].reference_id is None  # ...without the reference
        creates = fake.find_requests(*SEND_MESSAGE)
        reference = creates[-1].json["message_reference"]
        assert reference["fail_if_not_exists"] is False
        turns = await bot.memory.turns.history(world.general.id)
        assert [t.role for t in turns] == ["assistant"]  # the question went with its message
        assert turns[0].content == TEXT
    no_traceback(caplog)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_persona_reply_through_a_webhook_survives_resets(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """discord.py's webhook adapter retries 5xx itself but not a reset connection (on Linux)."""
    fake = world.fake
    engine = ScriptedEngine([TEXT], delay=0.01, piece=25)
    settings = bot_settings(tmp_path, "x", STREAM_INTERVAL="0")
    async with running_bot(fake, settings, engine=engine) as bot:
        await bot.memory.places.update_channel(world.general.id, world.guild.id, persona="Grumbold")
        sends = fake.inject(*EXECUTE_WEBHOOK, drop="reset")
        edits = fake.inject(*EDIT_WEBHOOK_MESSAGE, drop="reset", after=1)
        await ask(world)
        await fake.wait_for(
            lambda: bot.conv.pending == 0 and not bot.reply_tasks and hook_posts(fake, world),
        )
        assert sends.hits == 1 and edits.hits == 1
        posts = hook_posts(fake, world)
        assert [(m.content, m.username) for m in posts] == [(TEXT, "Grumbold")]
        turns = [
            t for t in await bot.memory.turns.history(world.general.id) if t.role == "assistant"
        ]
        assert [(t.content, t.persona) for t in turns] == [(TEXT, "Grumbold")]
        assert await bot.memory.turns.message_ids(turns[0].id) == [posts[0].id]
    no_traceback(caplog)


def hook_posts(fake: FakeDiscord, world: World) -> list[FakeMessage]:
    return [m for m in fake.channel_messages(world.general.id) if m.webhook_id is not None]
