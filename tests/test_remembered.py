"""Editing what the bot remembers, through the fake Discord: the message commands "Hide from the
bot" and "Edit remembered text" on a real bot with a real SQLite file.

The engine is `ScriptedEngine`, which records every prompt, so "left out of the prompt" reads
exactly what the model would have been given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.discord.remembered import EDITED, HIDDEN, NOT_STORED, NOT_YOURS
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import PATIENCE, FakeMessage, FakeUser, InteractionHandle
from tests.world import World

pytestmark = pytest.mark.slow


def bot_messages(w: World) -> list[FakeMessage]:
    return [m for m in w.fake.channel_messages(w.general.id) if m.author.id == w.fake.bot_user.id]


async def ask(w: World, bot: Any, user: FakeUser, text: str) -> FakeMessage:
    """Mention the bot with `text` and wait for its reply (the newest bot message)."""
    count = len(bot_messages(w))
    await w.fake.user_message(w.general.id, user, f"{w.fake.bot_user.mention} {text}")
    await w.fake.wait_for(lambda: len(bot_messages(w)) > count and bot.conv.pending == 0)
    return bot_messages(w)[-1]


async def private_answer(handle: InteractionHandle) -> str:
    response = await handle.wait_response(PATIENCE)
    if response.type == 5:  # deferred ("thinking…"): the placeholder becomes the answer
        message = await handle.wait_message(PATIENCE)
        assert message.ephemeral, message
        return message.content
    assert response.ephemeral, response
    return response.content or ""


async def menu(w: World, user: FakeUser, name: str, target: FakeMessage) -> InteractionHandle:
    return await w.fake.invoke_context_menu(w.general.id, user, name, target)


def modal_text(handle: InteractionHandle) -> tuple[str, str]:
    """The custom id and prefilled value of the modal's one text input."""
    assert handle.response is not None and handle.response.type == 9, handle.response
    found: list[dict[str, Any]] = []

    def walk(component: dict[str, Any]) -> None:
        if component.get("type") == 4:
            found.append(component)
        for child in component.get("components") or []:
            walk(child)
        if "component" in component:
            walk(component["component"])

    for component in handle.response.data["components"]:
        walk(component)
    (text_input,) = found
    return text_input["custom_id"], text_input.get("value") or ""


async def export_rows(w: World) -> list[dict[str, Any]]:
    handle = await w.fake.invoke_command(w.general.id, w.admin, "admin memory export", {})
    response = await handle.wait_response(PATIENCE)
    if response.type == 5:
        (attachment,) = (await handle.wait_message(PATIENCE)).attachments
    else:
        (attachment,) = response.files
    return [json.loads(line) for line in attachment.data.decode().splitlines()]


async def test_hide_from_the_bot_leaves_prompts_and_the_export_but_stays_stored(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Noted.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        secret = await w.fake.user_message(w.general.id, w.alice, "my locker code is 7391")
        reply = await ask(w, bot, w.bob, "hi there")
        assert "7391" in engine.prompts[-1]

        # someone else may not hide alice's message, nor edit it
        refused = await menu(w, w.bob, "Hide from the bot", secret)
        assert await private_answer(refused) == NOT_YOURS
        refused = await menu(w, w.bob, "Edit remembered text", secret)
        assert await private_answer(refused) == NOT_YOURS
        # nor a bot reply, which is the managers'
        refused = await menu(w, w.bob, "Hide from the bot", reply)
        assert await private_answer(refused) == NOT_YOURS
        turn = await bot.memory.turns.for_message(secret.id)
        assert turn is not None and not turn.hidden

        # the author may
        handle = await menu(w, w.alice, "Hide from the bot", secret)
        assert await private_answer(handle) == HIDDEN
        turn = await bot.memory.turns.for_message(secret.id)
        assert turn is not None and turn.hidden and turn.content == "my locker code is 7391"

        await ask(w, bot, w.bob, "what did alice say?")
        prompt = engine.prompts[-1]
        assert "what did alice say?" in prompt and "hi there" in prompt
        assert "7391" not in prompt

        # a manager may hide the bot's reply; the export leaves both hidden turns out
        handle = await menu(w, w.admin, "Hide from the bot", reply)
        assert await private_answer(handle) == HIDDEN
        rows = await export_rows(w)
        assert [r["content"] for r in rows] == ["hi there", "what did alice say?", "Noted."]
        assert not any("7391" in r["content"] for r in rows)
        assert len(await bot.memory.turns.history(w.general.id)) == 5  # nothing deleted

        actions = [(r.action, r.user_id) for r in await bot.memory.audit.latest(w.guild.id)]
        assert ("memory.hide", w.alice.id) in actions and ("memory.hide", w.admin.id) in actions

        # a message the bot never stored (its channel is off)
        switched = await w.fake.invoke_command(
            w.other.id, w.admin, "admin channel", {"mode": "off"}
        )
        await switched.wait_response(PATIENCE)
        stray = await w.fake.user_message(w.other.id, w.alice, "elsewhere")
        handle = await w.fake.invoke_context_menu(w.other.id, w.alice, "Hide from the bot", stray)
        assert await private_answer(handle) == NOT_STORED


async def test_edit_remembered_text_changes_the_next_prompt(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Sure thing.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        mine = await w.fake.user_message(w.general.id, w.alice, "my cat is called Mittens")
        reply = await ask(w, bot, w.alice, "noted?")
        assert "Mittens" in engine.prompts[-1]

        # the author opens the editor on her own message: it holds what memory holds
        handle = await menu(w, w.alice, "Edit remembered text", mine)
        await handle.wait_response(PATIENCE)
        custom_id, value = modal_text(handle)
        assert value == "my cat is called Mittens"
        done = await w.fake.submit_modal(handle, {custom_id: "my cat is called Pickles"})
        assert await private_answer(done) == EDITED
        assert w.fake.get_message(mine.id).content.endswith("Mittens")  # Discord unchanged

        await ask(w, bot, w.alice, "what is my cat called?")
        prompt = engine.prompts[-1]
        assert "my cat is called Pickles" in prompt and "Mittens" not in prompt

        # a manager edits the bot's reply; the audit keeps old and new text
        handle = await menu(w, w.admin, "Edit remembered text", reply)
        await handle.wait_response(PATIENCE)
        custom_id, value = modal_text(handle)
        assert value == "Sure thing."
        done = await w.fake.submit_modal(handle, {custom_id: "Pickles, got it."})
        assert await private_answer(done) == EDITED
        await ask(w, bot, w.alice, "again?")
        assert "Pickles, got it." in engine.prompts[-1]
        edits = [r for r in await bot.memory.audit.latest(w.guild.id) if r.action == "memory.edit"]
        assert [(r.user_id, r.old, r.new) for r in reversed(edits)] == [
            (w.alice.id, "my cat is called Mittens", "my cat is called Pickles"),
            (w.admin.id, "Sure thing.", "Pickles, got it."),
        ]
        # a plain member may not edit the bot's reply
        refused = await menu(w, w.alice, "Edit remembered text", reply)
        assert await private_answer(refused) == NOT_YOURS
