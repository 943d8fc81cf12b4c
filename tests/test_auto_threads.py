"""Auto-threads: a `threads` channel opens a public thread for a message addressed to the bot,
answers there, and the conversation goes on in the thread (through the fake Discord)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.discord.threads import THREAD_NAME_MAX, thread_name
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord.common import ChannelType
from tests.test_admin import bot_messages, command, mention, settle, stored
from tests.world import World

pytestmark = pytest.mark.slow


def test_thread_name_is_the_first_line_within_discords_limit() -> None:
    assert thread_name("\n  what's a good name for a cat?\nmore", "alice") == (
        "what's a good name for a cat?"
    )
    long = thread_name("word " * 60, "alice")
    assert len(long) == THREAD_NAME_MAX and long.endswith("…")
    assert thread_name("  \n", "alice") == "Chat with alice"


async def test_threads_channel_opens_a_thread_and_the_conversation_goes_on_there(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: f"reply {prompt.count('cat')}")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await command(w, w.admin, "admin channel", {"mode": "threads"})
        await command(w, w.admin, "admin settings set", {"name": "temperature", "value": "0.3"})
        said = await w.fake.user_message(w.general.id, w.bob, "just chatting, no bot")
        await stored(bot, said)
        asked = await mention(w, "what's a good name for a cat?")
        thread = await w.fake.wait_for(lambda: w.fake.channels.get(asked.id))
        # started from the message, public, in the channel, named from the message
        assert thread.type == ChannelType.PUBLIC_THREAD and thread.parent_id == w.general.id
        assert thread.name == "what's a good name for a cat?"
        await settle(w, bot, thread.id, 1)
        (first,) = bot_messages(w.fake, thread.id)
        assert first.reference_id is None  # in its own thread, not a reply across channels
        assert not bot_messages(w.fake, w.general.id)  # nothing answered in the channel
        assert engine.params[-1].temperature == 0.3  # the channel's settings hold in the thread

        # a follow-up in the thread needs no mention: the thread is the conversation
        await w.fake.user_message(thread.id, w.alice, "and for a cat that hates mornings?")
        await settle(w, bot, thread.id, 2)
        assert not bot_messages(w.fake, w.general.id)
        assert "good name for a cat" in engine.prompts[-1]  # the thread's memory holds it all
        assert "just chatting" not in engine.prompts[-1]  # the channel's talk is not in it
        turns = await bot.memory.turns.history(thread.id)
        assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[0].message_id == asked.id
        assert [t.content for t in await bot.memory.turns.history(w.general.id)] == [
            "just chatting, no bot"
        ]

        # a second addressed message opens a second thread
        again = await mention(w, "another question entirely")
        await w.fake.wait_for(lambda: w.fake.channels.get(again.id))
        await settle(w, bot, again.id, 1)
        assert not bot_messages(w.fake, w.general.id)
