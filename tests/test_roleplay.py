"""Roleplay conventions through the fake Discord: out-of-character lines (OOC_PREFIXES) are
stored hidden and never answered, and a server's ALLOWED_ROLES decides who may talk to the bot.

"Not answered" is proven by a later message's reply being the only one that arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.policy import NO_ALLOWED_ROLE
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import PATIENCE, FakeMessage, FakeUser
from tests.world import World

pytestmark = pytest.mark.slow


def bot_messages(w: World) -> list[FakeMessage]:
    return [
        m
        for m in w.fake.channel_messages(w.general.id)
        if m.author.id == w.fake.bot_user.id and m.interaction_metadata is None
    ]


async def say(w: World, user: FakeUser, text: str) -> FakeMessage:
    return await w.fake.user_message(w.general.id, user, f"{w.fake.bot_user.mention} {text}")


async def answered(w: World, bot: Any, count: int) -> list[FakeMessage]:
    await w.fake.wait_for(lambda: len(bot_messages(w)) >= count and bot.conv.pending == 0)
    return bot_messages(w)


async def admin(w: World, name: str, options: dict[str, Any]) -> str:
    handle = await w.fake.invoke_command(w.general.id, w.admin, name, options)
    response = await handle.wait_response(PATIENCE)
    if response.type == 5:
        return (await handle.wait_message(PATIENCE)).content
    return response.content or ""


async def test_out_of_character_lines_are_stored_hidden_and_not_answered(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "In character.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        ooc = [
            await say(w, w.alice, "((brb, pizza is here))"),
            await say(w, w.alice, "  // lag again, sorry"),
            await say(w, w.bob, "ooc: what time is the session tomorrow?"),
        ]
        asked = await say(w, w.alice, "I draw my sword.")
        (reply,) = await answered(w, bot, 1)
        assert reply.reference_id == asked.id  # the only reply answers the in-character line
        assert len(engine.prompts) == 1
        prompt = engine.prompts[0]
        assert "I draw my sword." in prompt
        assert "pizza" not in prompt and "lag" not in prompt and "session" not in prompt
        for message in ooc:  # kept, marked hidden
            turn = await bot.memory.turns.for_message(message.id)
            assert turn is not None and turn.hidden

        # the prefixes are a setting, per server too
        said = await admin(
            w, "admin settings set", {"name": "ooc_prefixes", "value": "[ooc]", "scope": "server"}
        )
        assert "`ooc_prefixes` is now" in said
        await say(w, w.alice, "[OOC] gotta go")
        later = await say(w, w.alice, "(( this is in character now")
        replies = await answered(w, bot, 2)
        assert len(replies) == 2 and replies[-1].reference_id == later.id
        assert "gotta go" not in engine.prompts[-1] and "(( this is" in engine.prompts[-1]
        # and none turns the convention off
        await admin(
            w, "admin settings set", {"name": "ooc_prefixes", "value": "None", "scope": "server"}
        )
        last = await say(w, w.alice, "[ooc] answered now")
        replies = await answered(w, bot, 3)
        assert replies[-1].reference_id == last.id


async def test_allowed_roles_ignore_members_without_one(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Welcome, player.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        said = await admin(
            w,
            "admin settings set",
            {"name": "allowed_roles", "value": str(w.muted.id), "scope": "server"},
        )
        assert "`allowed_roles` is now" in said
        ignored = await say(w, w.alice, "can I play?")  # alice has no allowed role
        asked = await say(w, w.carol, "I join the party.")  # carol has it
        (reply,) = await answered(w, bot, 1)
        assert reply.reference_id == asked.id and len(engine.prompts) == 1
        assert "can I play?" not in engine.prompts[0]
        assert await bot.memory.turns.for_message(ignored.id) is None  # not even stored
        # her commands are refused with the one line
        handle = await w.fake.invoke_command(w.general.id, w.alice, "regenerate", {})
        response = await handle.wait_response(PATIENCE)
        text = (
            (await handle.wait_message(PATIENCE)).content
            if response.type == 5
            else response.content
        )
        assert text == NO_ALLOWED_ROLE

        # an empty list lets everyone talk again
        await admin(
            w, "admin settings set", {"name": "allowed_roles", "value": "none", "scope": "server"}
        )
        again = await say(w, w.alice, "and now?")
        replies = await answered(w, bot, 2)
        assert replies[-1].reference_id == again.id
