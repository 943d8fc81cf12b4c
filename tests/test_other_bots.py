"""Other bots: ALLOW_BOTS lets listed bots talk to this one, BOT_CHAIN bounds how often it
answers them per human message, and its own posts (persona webhooks too) are never answered."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.settings import Settings
from tests.bot_harness import ScriptedEngine, running_bot
from tests.test_admin import command, stored
from tests.world import World

pytestmark = pytest.mark.slow


def ours(w: World, channel_id: int) -> list:
    """The bot's posts in a channel: as itself or through its persona webhooks."""
    return [
        m
        for m in w.fake.channel_messages(channel_id)
        if m.author.id == w.fake.bot_user.id or m.webhook_id is not None
    ]


async def test_an_allowed_bot_is_answered_an_unlisted_one_is_not(
    world: World, tmp_path: Path
) -> None:
    w = world
    friend = w.fake.add_member(w.guild.id, w.fake.add_user("friendbot", bot=True)).user
    stranger = w.fake.add_member(w.guild.id, w.fake.add_user("strangerbot", bot=True)).user
    me = w.fake.bot_user.mention
    engine = ScriptedEngine(lambda prompt: "beep back")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        # by default no bot is answered, nor stored (a member's later message proves it seen)
        await w.fake.user_message(w.general.id, friend, f"{me} hello, fellow bot")
        await stored(bot, await w.fake.user_message(w.general.id, w.bob, "bots, eh"))
        await command(
            w, w.admin, "admin settings set",
            {"name": "allow_bots", "value": str(friend.id), "scope": "server"},
        )  # fmt: skip
        await w.fake.user_message(w.general.id, stranger, f"{me} let me in")
        asked = await w.fake.user_message(w.general.id, friend, f"{me} hello again")
        await w.fake.wait_for(lambda: ours(w, w.general.id))
        human = await w.fake.user_message(w.general.id, w.alice, f"{me} and me?")
        await w.fake.wait_for(lambda: len(ours(w, w.general.id)) == 2 and not bot.conv.pending)
        first, second = ours(w, w.general.id)
        assert (first.reference_id, second.reference_id) == (asked.id, human.id)
        turns = await bot.memory.turns.history(w.general.id)
        assert [(t.name, t.role) for t in turns] == [
            ("bob", "user"), ("friendbot", "user"), (bot.conv.bot_name, "assistant"),
            ("alice", "user"), (bot.conv.bot_name, "assistant"),
        ]  # fmt: skip


async def test_a_two_bot_loop_stops_at_the_guard(world: World, tmp_path: Path) -> None:
    """Another bot that answers every reply of this one, in an `always` channel where this one
    speaks as a persona (through its webhook): after one human message this bot answers the
    other at most BOT_CHAIN times, and never its own webhook's posts."""
    w = world
    chain = Settings.__dataclass_fields__["bot_chain"].default
    echo = w.fake.add_member(w.guild.id, w.fake.add_user("echobot", bot=True)).user
    engine = ScriptedEngine(lambda prompt: "and what do you think?")
    settings = w.settings(tmp_path, ALLOW_BOTS=str(echo.id))
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await command(w, w.admin, "admin channel", {"mode": "always"})
        await command(w, w.admin, "persona use", {"name": "Sable"})
        base = len(ours(w, w.general.id))  # Sable's greeting, posted through the webhook
        await w.fake.user_message(w.general.id, w.alice, "start talking, you two")
        for n in range(1, chain + 2):  # the human's reply, then one per allowed bot message
            await w.fake.wait_for(lambda n=n: len(ours(w, w.general.id)) == base + n)
            await w.fake.user_message(w.general.id, echo, f"echo {n}: what do you think?")
        # the last echo is stored but not answered: the next human message is answered first
        again = await w.fake.user_message(w.general.id, w.alice, "enough, you two")
        await w.fake.wait_for(lambda: len(ours(w, w.general.id)) == base + chain + 2)
        await w.fake.wait_for(lambda: not bot.conv.pending)
        replies = ours(w, w.general.id)
        assert len(replies) == base + chain + 2
        assert all(m.webhook_id is not None for m in replies)  # posted as the persona
        assert replies[-1].reference_id is None or replies[-1].reference_id == again.id
        everything = w.fake.channel_messages(w.general.id)
        assert everything.index(replies[-1]) > everything.index(again)
        turns = await bot.memory.turns.history(w.general.id)
        echoes = [t for t in turns if t.name == "echobot"]
        assert len(echoes) == chain + 1  # every echo is remembered, the last one unanswered
        assert [t.name for t in turns[-3:-1]] == ["echobot", "alice"]
        # and the guard counts again from the human message: the bots may talk once more
        await w.fake.user_message(w.general.id, echo, "echo: one more?")
        await w.fake.wait_for(lambda: len(ours(w, w.general.id)) == base + chain + 3)
