"""The ⏹ button through the fake Discord: a reply being written is stopped mid-stream.

The engine is `ScriptedEngine` with `steps`: every piece waits for one release, as a decode
step would, so the test holds a reply half-written exactly as long as it needs and proves what
happens after the press by the next events, never by waiting.
"""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest

from bot.discord.stopping import FINISHED, NOT_YOURS, STOP_LABEL
from bot.engine import RequestState
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import PATIENCE, FakeMessage, FakeUser, InteractionHandle
from tests.world import World

pytestmark = pytest.mark.slow

PIECE = 10
STORY = "Once upon a time a dragon hoarded teacups and sang to them every night."
_YOU = re.compile(r"^- (.+) \(you\)", re.MULTILINE)


def release(steps: asyncio.Semaphore, n: int) -> None:
    """Let `n` more pieces out (`n` decode steps)."""
    for _ in range(n):
        steps.release()


def shown(pieces: int) -> str:
    """What a message shows of STORY after `pieces` pieces."""
    return STORY[: pieces * PIECE].strip()


def buttons(message: FakeMessage) -> dict[str, str]:
    """The message's buttons: label -> custom id."""
    return {
        item.get("label", ""): item["custom_id"]
        for row in message.components
        for item in row.get("components", [])
    }


def current(w: World, message: FakeMessage) -> FakeMessage:
    return w.fake.get_message(message.id)


async def press(w: World, message: FakeMessage, user: FakeUser) -> InteractionHandle:
    handle = await w.fake.click_button(
        current(w, message), buttons(current(w, message))[STOP_LABEL], user
    )
    await handle.wait_response(PATIENCE)
    return handle


def private(handle: InteractionHandle) -> str:
    assert handle.response is not None and handle.response.ephemeral
    return handle.response.content or ""


def posted(w: World, **match: Any) -> list[FakeMessage]:
    return [
        m
        for m in w.fake.channel_messages(w.general.id)
        if (m.author.id == w.fake.bot_user.id or m.webhook_id is not None)
        and m.interaction_metadata is None
        and all(getattr(m, k) == v for k, v in match.items())
    ]


async def test_a_press_mid_stream_stops_the_reply_and_keeps_what_was_written(
    world: World, tmp_path: Path
) -> None:
    w = world
    steps = asyncio.Semaphore(0)
    engine = ScriptedEngine([STORY, "The end.", "Short answer."], piece=PIECE, steps=steps)
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        asked = await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} tell me a story"
        )
        release(steps, 2)  # a stream stays one piece behind: two pieces show the first
        (reply,) = await w.fake.wait_for(lambda: posted(w))
        await w.fake.wait_for(lambda: current(w, reply).content == shown(1))
        assert reply.reference_id == asked.id
        assert list(buttons(current(w, reply))) == [STOP_LABEL]  # only ⏹ while it is written

        # someone else's press is refused, privately, and the reply goes on
        handle = await press(w, reply, w.bob)
        assert private(handle) == NOT_YOURS
        release(steps, 1)
        await w.fake.wait_for(lambda: current(w, reply).content == shown(2))

        # the asker's press stops it: the engine ends the request at its next step
        handle = await press(w, reply, w.alice)
        assert handle.response is not None and handle.response.type == 6  # no message, no noise
        release(steps, len(STORY))  # steps enough for the whole story: none is used
        request = engine.requests[0]
        await w.fake.wait_for(lambda: request.state is RequestState.CANCELLED)
        await w.fake.wait_for(
            lambda: bot.conv.pending == 0 and STOP_LABEL not in buttons(current(w, reply))
        )
        assert request.stats.new_tokens == 3  # the three pieces released before the press
        assert current(w, reply).content == shown(3)  # the text so far stays as the reply
        assert "🔁" in buttons(current(w, reply))  # the final edit brought the swipe buttons

        turn = await bot.memory.turns.for_message(reply.id)
        assert turn is not None and turn.stopped and turn.content == shown(3)

        # /continue works on it, and a continued reply is no longer marked stopped
        handle = await w.fake.invoke_command(w.general.id, w.alice, "continue", {})
        if (await handle.wait_response(PATIENCE)).type == 5:
            assert (await handle.wait_message(PATIENCE)).content == "Continued."
        continued = await bot.memory.turns.get(turn.id)
        assert continued is not None and not continued.stopped
        assert continued.content == f"{shown(3)} The end."
        (addition,) = [m for m in posted(w) if m.id != reply.id]
        assert addition.content == "The end."  # posted as a new message after it

        # a later reply proves the stopped one stopped growing; its prompt holds the partial text
        later = await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} and then?"
        )
        await w.fake.wait_for(lambda: len(posted(w)) == 3 and bot.conv.pending == 0)
        assert posted(w)[-1].reference_id == later.id
        assert posted(w)[-1].content == "Short answer."
        assert current(w, reply).content == shown(3)
        assert f"{shown(3)}" in engine.prompts[-1]
        assert STORY[3 * PIECE :].strip() not in engine.prompts[-1]
        stored = await bot.memory.turns.for_message(posted(w)[-1].id)
        assert stored is not None and not stored.stopped


async def test_a_press_after_the_reply_is_done_is_told_it_is_finished(
    world: World, tmp_path: Path
) -> None:
    w = world
    steps = asyncio.Semaphore(0)
    engine = ScriptedEngine([STORY], piece=PIECE, steps=steps)
    settings = w.settings(tmp_path)
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} a story?")
        release(steps, 2)
        (reply,) = await w.fake.wait_for(lambda: posted(w))
        await w.fake.wait_for(lambda: STOP_LABEL in buttons(current(w, reply)))
        held = copy.deepcopy(current(w, reply))  # as a slow client still shows it, ⏹ and all
        release(steps, len(STORY))
        await w.fake.wait_for(
            lambda: bot.conv.pending == 0 and STOP_LABEL not in buttons(current(w, reply))
        )
        assert current(w, reply).content == STORY
        turn = await bot.memory.turns.for_message(reply.id)
        assert turn is not None and not turn.stopped
        handle = await w.fake.click_button(held, buttons(held)[STOP_LABEL], w.alice)
        await handle.wait_response(PATIENCE)
        assert private(handle) == FINISHED
        assert current(w, reply).content == STORY
    # and after a restart (a ⏹ left by a process killed mid-reply is registered too)
    async with running_bot(w.fake, settings, engine=ScriptedEngine(["-"])):
        handle = await w.fake.click_button(held, buttons(held)[STOP_LABEL], w.alice)
        await handle.wait_response(PATIENCE)
        assert private(handle) == FINISHED


async def test_in_a_scene_a_press_stops_that_members_reply_only(
    world: World, tmp_path: Path
) -> None:
    w = world
    steps = asyncio.Semaphore(0)

    def speaker(prompt: str) -> str:
        found = _YOU.findall(prompt)
        return found[-1] if found else ""

    engine = ScriptedEngine(
        lambda prompt: STORY if speaker(prompt) == "Sable" else "Aye, a fine tale.",
        piece=PIECE,
        steps=lambda prompt: steps if speaker(prompt) == "Sable" else None,
    )
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        for name in ("Sable", "Grumbold"):
            handle = await w.fake.invoke_command(
                w.general.id, w.alice, "persona scene add", {"name": name}
            )
            if (await handle.wait_response(PATIENCE)).type == 5:
                await handle.wait_message(PATIENCE)
        await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} Sable, Grumbold: a story?"
        )
        release(steps, 2)
        (sable,) = await w.fake.wait_for(lambda: posted(w, username="Sable"))
        await w.fake.wait_for(lambda: current(w, sable).content == shown(1))
        assert not posted(w, username="Grumbold")  # shown once Sable is done
        handle = await press(w, sable, w.alice)
        assert handle.response is not None and handle.response.type == 6
        release(steps, len(STORY))
        (grumbold,) = await w.fake.wait_for(lambda: posted(w, username="Grumbold"))
        await w.fake.wait_for(lambda: bot.conv.pending == 0)
        assert current(w, sable).content == shown(2)
        assert current(w, grumbold).content == "Aye, a fine tale."  # not stopped
        sable_turn = await bot.memory.turns.for_message(sable.id)
        grumbold_turn = await bot.memory.turns.for_message(grumbold.id)
        assert sable_turn is not None and sable_turn.stopped and sable_turn.content == shown(2)
        assert grumbold_turn is not None and not grumbold_turn.stopped
