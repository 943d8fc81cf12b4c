"""Delivery (issue 23): answers reach Discord the way Discord wants them.

The real HermesBot runs against the protocol-level fake Discord on a real SQLite file. Every
slash command is acknowledged ("thinking…") before it runs and its answer edits that
placeholder, so a command slower than Discord's 3 s deadline still answers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.discord.answering import AT_ONCE
from bot.engine import Engine, EngineRequest
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import (
    FakeDiscord,
    FakeFile,
    FakeMessage,
    InteractionHandle,
    RecordedRequest,
)
from tests.test_scenes import speaker
from tests.world import World

pytestmark = pytest.mark.slow


def callback(fake: FakeDiscord, handle: InteractionHandle) -> int:
    """Index in the fake's request log of the interaction's initial callback."""
    path = f"/interactions/{handle.id}/{handle.token}/callback"
    return next(i for i, r in enumerate(fake.requests) if r.path == path)


def original_edits(fake: FakeDiscord, handle: InteractionHandle) -> list[int]:
    """Indexes of the edits of the interaction's @original message."""
    path = f"/webhooks/{fake.application_id}/{handle.token}/messages/@original"
    return [i for i, r in enumerate(fake.requests) if r.method == "PATCH" and r.path == path]


class SlowLoad(ScriptedEngine):
    """An engine whose load (`start`) lasts until the test opens `loaded`: a model reload
    that outlasts the interaction deadline for exactly as long as the test needs."""

    def __init__(self, loaded: asyncio.Event) -> None:
        super().__init__(["ok"])
        self.loaded = loaded
        self.loading = asyncio.Event()

    async def start(self) -> None:
        self.loading.set()
        await self.loaded.wait()
        await super().start()


async def test_a_slow_admin_command_answers_after_deferring(world: World, tmp_path: Path) -> None:
    w = world
    loaded = asyncio.Event()
    made: list[SlowLoad] = []

    def factory(settings: Any, *, model: str | None = None) -> Engine:
        made.append(SlowLoad(loaded))
        return made[-1]

    first = ScriptedEngine(["ok"])
    async with running_bot(
        w.fake, w.settings(tmp_path), engine=first, engine_factory=factory
    ) as bot:
        handle = await w.fake.invoke_command(w.general.id, w.admin, "admin model reload")
        response = await handle.wait_response()
        assert response.type == 5 and response.ephemeral  # "thinking…", privately
        # the new model is loading and nothing but the placeholder is shown yet
        await w.fake.wait_for(lambda: made and made[0].loading.is_set())
        assert handle.original is not None and handle.original.loading
        assert not original_edits(w.fake, handle) and not handle.followups

        loaded.set()
        message = await handle.wait_message()
        assert message.content.startswith("Now serving `scripted`") and message.ephemeral
        assert bot.conv.engine is made[0]
        # one acknowledgement in time, then the placeholder edited into the answer
        assert not handle.expired and not handle.followups
        edits = original_edits(w.fake, handle)
        assert len(edits) == 1 and callback(w.fake, handle) < edits[0]


def leaf_commands(fake: FakeDiscord, guild_id: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """Every registered slash command as (full name, its options)."""
    out: list[tuple[str, list[dict[str, Any]]]] = []

    def walk(name: str, options: list[dict[str, Any]]) -> None:
        subs = [o for o in options if o["type"] in (1, 2)]
        if not subs:
            out.append((name, options))
        for sub in subs:
            walk(f"{name} {sub['name']}", sub.get("options") or [])

    for scope in (guild_id, None):
        for cmd in fake._commands.get(scope, []):
            if cmd.get("type", 1) == 1:
                walk(cmd["name"], cmd.get("options") or [])
    return out


def required_values(w: World, options: list[dict[str, Any]]) -> dict[str, Any]:
    """A value for each required option, as a member would pick one."""
    by_type: dict[int, Any] = {3: "Grumbold", 4: 1, 5: True, 6: w.bob, 7: w.general, 8: w.muted,
                               9: w.bob, 10: 0.5, 11: FakeFile("card.json", b"{}")}  # fmt: skip
    values: dict[str, Any] = {}
    for opt in options:
        if opt.get("required"):
            choices = opt.get("choices")
            values[opt["name"]] = choices[0]["value"] if choices else by_type[opt["type"]]
    return values


async def test_every_slash_command_is_acknowledged_before_it_answers(
    world: World, tmp_path: Path
) -> None:
    """Each command defers first and then edits its answer in, except the ones whose first
    response is a form (they answer at once)."""
    w = world
    settings = w.settings(tmp_path, CONFIRM_TIMEOUT="1")

    def factory(settings: Any, *, model: str | None = None) -> Engine:
        return ScriptedEngine(["ok"])

    async with running_bot(w.fake, settings, engine_factory=factory) as bot:
        at_once = {c.qualified_name for c in bot.tree.walk_commands() if c.extras.get(AT_ONCE)}
        assert at_once  # the forms
        commands = leaf_commands(w.fake, w.guild.id)
        assert len(commands) > 30
        for name, options in commands:
            handle = await w.fake.invoke_command(
                w.general.id, w.admin, name, required_values(w, options)
            )
            response = await handle.wait_response()
            if name in at_once:
                assert response.type in (4, 9), (name, response.type)
                continue
            assert response.type == 5 and response.ephemeral, (name, response.type)
            message = await handle.wait_message()
            assert (message.content or message.embeds) and message.ephemeral, name
            assert (
                not handle.expired and callback(w.fake, handle) < original_edits(w.fake, handle)[0]
            )


# ---- streaming and swipe buttons -------------------------------------------------------------


class Paced(ScriptedEngine):
    """Streams each reply's first `head` characters, then waits for `more` before the rest: the
    test sees a reply half-shown for as long as it needs, with no sleep to outlast."""

    def __init__(self, script: Any, head: int = 6) -> None:
        super().__init__(script)
        self.head = head
        self.more = asyncio.Event()

    async def _feed(self, gen: EngineRequest, reply: str | BaseException) -> None:
        assert isinstance(reply, str)
        gen.stats.started_at = gen.stats.queued_at
        for char in reply[: self.head]:  # a piece at a time, as a model writes
            gen.stats.new_tokens += 1
            gen.emit(char)
        await self.more.wait()
        gen.stats.new_tokens += 1
        gen.emit(reply[self.head :])
        gen.finish("eos")


def requests(fake: FakeDiscord, method: str, path: str) -> list[RecordedRequest]:
    return [r for r in fake.requests if r.method == method and r.path == path]


def buttons(message: FakeMessage) -> list[str]:
    return [item["custom_id"] for row in message.components for item in row["components"]]


def button_kind(components: list[dict] | None) -> str | None:
    """Which buttons a send or edit carried: "stop" (⏹, while a reply is written), "swipe"
    (with the final text), or None."""
    ids = [item["custom_id"] for row in components or [] for item in row["components"]]
    if not ids:
        return None
    return "stop" if all(i.startswith("stop:") for i in ids) else "swipe"


async def test_swipe_buttons_come_with_the_final_edit(world: World, tmp_path: Path) -> None:
    """A streamed reply is one send and one edit: the final text and its swipe buttons
    together (no edit of their own), and the buttons work."""
    w = world
    engine = Paced(["Hello there, my friend.", "A second thought."])
    settings = w.settings(tmp_path, STREAM_INTERVAL="60")  # no streaming edit in between
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} hi")
        first = await w.fake.wait_for(lambda: bot_posts(w.fake, w.general.id))
        reply = first[0]
        assert reply.content == "Hello"[: len(reply.content)]  # growing, with only ⏹ under it
        assert button_kind(reply.components) == "stop"
        engine.more.set()
        await w.fake.wait_for(lambda: reply.components and bot.conv.pending == 0)
        path = f"/channels/{w.general.id}/messages"
        (send,) = requests(w.fake, "POST", path)
        (edit,) = requests(w.fake, "PATCH", f"{path}/{reply.id}")
        assert button_kind(send.json.get("components")) == "stop"
        assert edit.json["content"] == "Hello there, my friend."
        assert button_kind(edit.json["components"]) == "swipe"  # ⏹ gone with the final edit
        assert reply.content == "Hello there, my friend."
        assert len(buttons(reply)) == 4

        # the buttons find their reply from the message they are on
        assert "swipe:new" in buttons(reply)
        await (await w.fake.click_button(reply, "swipe:new", w.alice)).wait_response()
        await w.fake.wait_for(lambda: reply.content == "A second thought.")
        stored = await bot.memory.turns.for_message(reply.id)
        assert stored is not None and stored.content == "A second thought."


def bot_posts(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    """What the bot or its personas posted in a channel (not command answers)."""
    return [
        m
        for m in fake.channel_messages(channel_id)
        if (m.author.id == fake.bot_user.id or m.webhook_id is not None)
        and m.interaction_metadata is None
    ]


# ---- scenes: streamed in turn, followed by threads -------------------------------------------


def webhook_posts(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    return [m for m in fake.channel_messages(channel_id) if m.webhook_id is not None]


async def cast(w: World, channel_id: int, *names: str) -> None:
    for name in names:
        handle = await w.fake.invoke_command(
            channel_id, w.alice, "persona scene add", {"name": name}
        )
        assert "joins the scene" in (await handle.wait_message()).content


async def test_scene_replies_stream_in_turn(world: World, tmp_path: Path) -> None:
    """Two named members: the first one's reply is shown while it is still being written, the
    second starts once the first is done."""
    w = world
    engine = Paced(lambda prompt: f"{speaker(prompt)} here, at your service.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await cast(w, w.general.id, "Grumbold", "Sable")
        await w.fake.user_message(w.general.id, w.alice, "Sable and Grumbold, a word?")
        shown = await w.fake.wait_for(lambda: webhook_posts(w.fake, w.general.id))
        await w.fake.wait_for(lambda: len(engine.prompts) == 2)  # both are being written
        (sable,) = shown  # Grumbold waits for his turn
        assert sable.username == "Sable" and sable.content == "Sable"[: len(sable.content)]
        engine.more.set()
        await w.fake.wait_for(
            lambda: len(webhook_posts(w.fake, w.general.id)) == 2 and bot.conv.pending == 0
        )
        first, second = webhook_posts(w.fake, w.general.id)
        assert (first.id, first.content) == (sable.id, "Sable here, at your service.")
        assert (second.username, second.content) == ("Grumbold", "Grumbold here, at your service.")
        # Sable's reply grew in place, her buttons came with her final edit, and all of it
        # went out before Grumbold's first message
        app = f"/webhooks/{w.fake.application_id}/"
        by_id = {str(first.id): "Sable", str(second.id): "Grumbold"}
        calls = [  # (who, send or edit, with buttons) of every persona webhook call, in order
            (r.json["username"] if r.method == "POST" else by_id[r.path.rsplit("/", 1)[1]],
             r.method, button_kind(r.json.get("components")))
            for r in w.fake.requests
            if r.path.startswith("/webhooks/") and not r.path.startswith(app)
            and (r.method, "/messages/" in r.path) in (("POST", False), ("PATCH", True))
        ]  # fmt: skip
        sable_calls = [c for c in calls if c[0] == "Sable"]
        assert calls[: len(sable_calls)] == sable_calls and calls[len(sable_calls)][0] == "Grumbold"
        assert sable_calls[0] == ("Sable", "POST", "stop") and len(sable_calls) > 2
        assert sable_calls[-1] == ("Sable", "PATCH", "swipe")
        assert not any(kind == "swipe" for *_, kind in sable_calls[:-1])
        assert second.components and first.components


async def test_a_thread_follows_its_channels_scene_unless_it_has_its_own(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: f"{speaker(prompt)} answers.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await cast(w, w.general.id, "Grumbold", "Sable")
        side = w.fake.add_thread(w.general.id, "side room")
        own = w.fake.add_thread(w.general.id, "MIRA's room")
        await cast(w, own.id, "MIRA")

        # the thread has no cast: its channel's speaks there, named as in the channel
        await w.fake.user_message(side.id, w.alice, "Sable, what do you see?")
        await w.fake.wait_for(lambda: webhook_posts(w.fake, side.id) and bot.conv.pending == 0)
        (reply,) = webhook_posts(w.fake, side.id)
        assert (reply.username, reply.content) == ("Sable", "Sable answers.")
        assert "- Grumbold: " in engine.prompts[-1]  # the roster is the channel's cast
        listing = await w.fake.invoke_command(side.id, w.alice, "persona scene list")
        assert "**Sable**" in (await listing.wait_message()).content

        # a thread with a cast of its own: only that cast answers there
        await w.fake.user_message(own.id, w.alice, "Sable and MIRA, hello")
        await w.fake.wait_for(lambda: webhook_posts(w.fake, own.id) and bot.conv.pending == 0)
        assert [(m.username, m.content) for m in webhook_posts(w.fake, own.id)] == [
            ("MIRA", "MIRA answers.")
        ]
        assert not webhook_posts(w.fake, w.general.id)  # nothing was said in the channel
