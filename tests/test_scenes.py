"""Scenes, name wake words, swipes and the persona-switch rule, through the fake Discord.

The real bot runs against the protocol-level fake; the engine is `ScriptedEngine`, which
answers through the `Engine` interface and records every prompt it is sent, so the prompt
assertions read exactly what the model would have been given.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bot.discord.swipes import GONE, NOT_YOURS, SETTLED
from bot.engine import EngineRequest, GenerationParams
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import PATIENCE, FakeMessage, FakeUser, InteractionHandle
from tests.world import World

pytestmark = pytest.mark.slow

CAST3 = ("Grumbold", "Sable", "MIRA")
_YOU = re.compile(r"^- (.+) \(you\)", re.MULTILINE)


def speaker(prompt: str) -> str:
    """Which cast member a prompt is for: the roster marks it "(you)"."""
    found = _YOU.findall(prompt)
    return found[-1] if found else "Hermes"


# ---- helpers ------------------------------------------------------------------------------


async def answer(handle: InteractionHandle, timeout: float = PATIENCE) -> tuple[str, bool]:
    """A command's (or button's) text answer and whether it was private."""
    response = await handle.wait_response(timeout)
    if response.type == 5:
        message = await handle.wait_message(timeout)
        return message.content, message.ephemeral
    return response.content or "", bool((response.data.get("flags") or 0) & 64)


async def command(
    w: World, name: str, options: dict[str, Any] | None = None, *, user: FakeUser | None = None
) -> str:
    handle = await w.fake.invoke_command(w.general.id, user or w.alice, name, options or {})
    text, private = await answer(handle)
    assert private, (name, text)
    return text


def replies(w: World) -> list[FakeMessage]:
    """What the bot's personas (webhooks) and the bot itself posted in #general."""
    return [
        m
        for m in w.fake.channel_messages(w.general.id)
        if (m.webhook_id is not None or m.author.id == w.fake.bot_user.id)
        and m.interaction_metadata is None
    ]


async def settled(w: World, bot: Any, count: int, timeout: float = PATIENCE) -> list[FakeMessage]:
    await w.fake.wait_for(lambda: len(replies(w)) >= count and bot.conv.pending == 0, timeout)
    return replies(w)


def custom_ids(message: FakeMessage) -> dict[str, dict[str, Any]]:
    """The message's buttons by action (prev, count, next, new)."""
    out: dict[str, dict[str, Any]] = {}
    for row in message.components:
        for item in row.get("components", []):
            out[item["custom_id"].split(":")[1]] = item
    return out


async def cast_scene(w: World, names: tuple[str, ...]) -> None:
    for name in names:
        assert "joins the scene" in await command(w, "persona scene add", {"name": name})


# ---- scenes -------------------------------------------------------------------------------


async def test_naming_two_of_three_gets_their_two_replies_in_order_with_their_own_prompts(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: f"{speaker(prompt)} here.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await cast_scene(w, CAST3)
        listing = await command(w, "persona scene list")
        assert "1. **Grumbold**" in listing and "3. **MIRA**" in listing

        # mention mode: the bot is @mentioned, and the message names Sable first, then Grumbold
        await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} sable and GRUMBOLD, who did it?"
        )
        first = await settled(w, bot, 2)
        assert [(m.username, m.content) for m in first] == [
            ("Sable", "Sable here."),
            ("Grumbold", "Grumbold here."),
        ]
        assert all(m.webhook_id is not None for m in first)
        assert len(engine.prompts) == 2  # MIRA was not asked
        assert {speaker(p) for p in engine.prompts} == {"Sable", "Grumbold"}
        sable = next(p for p in engine.prompts if speaker(p) == "Sable")
        # the roster with one line each, in the Input block; every other cast name is a stop
        assert "Characters in this scene:\n- Grumbold: " in sable
        assert "- Sable (you): " in sable and "\n- MIRA: " in sable
        stops = engine.params[engine.prompts.index(sable)].stop
        assert "\nGrumbold:" in stops and "\nMIRA:" in stops and "\nSable:" not in stops

        # the next message names MIRA then Grumbold: each sees the others as named lines and
        # only its own earlier turns as Responses
        await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} MIRA, Grumbold: thoughts?"
        )
        later = await settled(w, bot, 4)
        assert [m.username for m in later[2:]] == ["MIRA", "Grumbold"]
        # a message naming nobody (mention mode, wake words off) is stored, not answered...
        await w.fake.user_message(w.general.id, w.bob, "Sables? anyone?")
        # ...and one that @mentions the bot but names nobody gets one member, by the policy
        await w.fake.user_message(w.general.id, w.bob, f"{w.fake.bot_user.mention} and you?")
        assert len(await settled(w, bot, 5)) == 5 and len(engine.prompts) == 5
        assert "bob: Sables? anyone?" in engine.prompts[-1]
        mira = engine.prompts[2] if speaker(engine.prompts[2]) == "MIRA" else engine.prompts[3]
        grum = engine.prompts[2] if speaker(engine.prompts[2]) == "Grumbold" else engine.prompts[3]
        for line in ("Sable: Sable here.", "Grumbold: Grumbold here."):
            assert f"### Instruction:\n{line}\n\n" in mira
        assert "### Response:\n" not in mira[: mira.rindex("### Response:\n")]
        assert "### Instruction:\nSable: Sable here.\n\n" in grum
        assert "### Response:\nGrumbold here.\n\n" in grum
        assert "### Response:\nSable here." not in grum
        assert "Grumbold: Grumbold here." not in grum
        assert "alice: MIRA, Grumbold: thoughts?" in mira

        # memory records the speaking persona per turn; the export carries it
        turns = await bot.memory.turns.history(w.general.id)
        said = [(t.persona, t.name, t.content) for t in turns if t.role == "assistant"][:4]
        assert said[:2] == [("Sable", "Sable", "Sable here."), ("Grumbold", "Grumbold", "Grumbold here.")]  # fmt: skip
        handle = await w.fake.invoke_command(w.general.id, w.admin, "admin memory export", {})
        files = (await handle.wait_message(10)).attachments  # the deferred answer
        rows = [json.loads(line) for line in files[0].data.decode().splitlines()]
        assert [r["persona"] for r in rows if r["role"] == "assistant"][:2] == ["Sable", "Grumbold"]


async def test_naming_cast_members_addresses_them_in_a_mention_channel(
    world: World, tmp_path: Path
) -> None:
    """Issue 23: no @mention and WAKE_WORDS off, yet naming two cast members (one in another
    script's look-alike letters) gets both their replies, in the order named."""
    w = world
    engine = ScriptedEngine(lambda prompt: f"{speaker(prompt)} here.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await cast_scene(w, CAST3)
        await w.fake.user_message(w.general.id, w.alice, "Ѕable and grumbold, what do you think?")
        posted = await settled(w, bot, 2)
        assert [(m.username, m.content) for m in posted] == [
            ("Sable", "Sable here."),
            ("Grumbold", "Grumbold here."),
        ]
        assert len(engine.prompts) == 2  # MIRA was not named
        # a message naming no one is stored, not answered: the next one named MIRA
        await w.fake.user_message(w.general.id, w.bob, "nice weather for a mystery")
        await w.fake.user_message(w.general.id, w.bob, "what about you, Mira?")
        posted = await settled(w, bot, 3)
        assert [m.username for m in posted] == ["Sable", "Grumbold", "MIRA"]
        assert "bob: nice weather for a mystery" in engine.prompts[-1]


class TogetherEngine(ScriptedEngine):
    """Holds every reply until `together` requests are in flight at once: a scene that asked
    its members one after another would never get an answer."""

    def __init__(self, together: int) -> None:
        super().__init__(lambda prompt: f"{speaker(prompt)} answers.")
        self.together = together
        self.all_in = asyncio.Event()
        self.cache_keys: list[str | None] = []

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> EngineRequest:
        self.cache_keys.append(cache_key)
        if len(self.prompts) + 1 >= self.together:
            self.all_in.set()
        return super().generate(prompt, params, cache_key=cache_key)

    async def _feed(self, gen: EngineRequest, reply: str | BaseException) -> None:
        await self.all_in.wait()
        await super()._feed(gen, reply)


async def test_members_replies_are_generated_together_and_regenerate_keeps_the_speaker(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = TogetherEngine(together=3)
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await cast_scene(w, CAST3)
        await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} MIRA, Sable, Grumbold: report!"
        )
        posted = await settled(w, bot, 3)
        assert [m.username for m in posted] == ["MIRA", "Sable", "Grumbold"]
        # three requests in flight together, each in its own prompt-cache slot
        assert len(set(engine.cache_keys)) == 3
        assert all(k.startswith(f"{w.general.id}:") for k in engine.cache_keys if k)

        # /regenerate replaces the last reply as the persona that spoke it
        assert await command(w, "regenerate") == "Regenerated."
        await w.fake.wait_for(lambda: w.fake.get_message(posted[-1].id).deleted)
        *_, last = await settled(w, bot, 3)
        assert last.username == "Grumbold" and last.id != posted[-1].id
        assert speaker(engine.prompts[-1]) == "Grumbold"
        turns = [t for t in await bot.memory.turns.history(w.general.id) if t.role == "assistant"]
        assert [t.persona for t in turns] == ["MIRA", "Sable", "Grumbold"]


async def test_the_chain_limit_holds_in_an_always_channel(world: World, tmp_path: Path) -> None:
    """Four members who always name each other: each human message gets one reply and at most
    SCENE_CHAIN (1) reply between members, never a storm."""
    w = world
    cast = ("Grumbold", "Sable", "MIRA", "Hermes")

    def script(prompt: str) -> str:
        me = speaker(prompt)
        return " ".join(f"{n}?" for n in cast if n != me) + f" says {me}."

    async with running_bot(w.fake, w.settings(tmp_path), engine=ScriptedEngine(script)) as bot:
        handle = await w.fake.invoke_command(w.general.id, w.admin, "admin channel", {"mode": "always"})  # fmt: skip
        await answer(handle, 10)  # answered (after its defer): the mode is stored
        await cast_scene(w, cast)
        for i in range(50):
            await w.fake.user_message(w.general.id, w.alice, f"The party waits ({i}).")
        posted = await settled(w, bot, 100, timeout=120)
        humans = [t for t in await bot.memory.turns.history(w.general.id) if t.role == "user"]
        assert len(humans) == 50
        assert len(posted) <= 50 * (1 + bot.settings.scene_chain)
        assert len(posted) == 100  # every message: one pick, then one member answering it
        for a, b in zip(posted[::2], posted[1::2], strict=True):
            assert a.username != b.username and a.username in cast and b.username in cast
            assert f"says {b.username}." in b.content


async def test_scene_commands_mute_policy_scenario_and_limits(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: f"{speaker(prompt)} speaks.")
    settings = w.settings(tmp_path, SCENE_MAX="2")
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await cast_scene(w, ("Grumbold", "Sable"))
        full = await command(w, "persona scene add", {"name": "MIRA"})
        assert "full (2 personas)" in full
        assert "no persona called" in await command(w, "persona scene add", {"name": "Nobody"})
        assert "muted" in await command(w, "persona scene mute", {"name": "sable"})
        await command(w, "persona scene policy", {"policy": "list"})
        await command(w, "persona scene scenario", {"text": "A storm traps everyone inside."})
        # list policy in an always channel: Grumbold (Sable is muted, and skipped)
        handle = await w.fake.invoke_command(w.general.id, w.admin, "admin channel", {"mode": "always"})  # fmt: skip
        await answer(handle, 10)  # answered (after its defer): the mode is stored
        await w.fake.user_message(w.general.id, w.alice, "Anyone there?")
        await w.fake.user_message(w.general.id, w.alice, "Sable, you too?")  # muted: not her
        await w.fake.user_message(w.general.id, w.bob, "Hello?")
        posted = await settled(w, bot, 3)
        assert [m.username for m in posted] == ["Grumbold"] * 3
        assert "Scene: A storm traps everyone inside." in engine.prompts[0]
        await command(w, "persona scene unmute", {"name": "Sable"})
        await command(w, "persona scene policy", {"policy": "manual"})
        assert "answers the next message" in await command(
            w, "persona scene next", {"name": "Sable"}
        )
        await w.fake.user_message(w.general.id, w.alice, "Who speaks?")
        posted = await settled(w, bot, 4)
        assert posted[-1].username == "Sable"
        assert "left the scene" in await command(w, "persona scene remove", {"name": "Sable"})
        await command(w, "persona scene clear")
        assert (await bot.memory.scenes.get(w.general.id)).members == []


# ---- wake words ---------------------------------------------------------------------------


async def test_wake_words_off_by_default_then_on_per_channel(world: World, tmp_path: Path) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: "Yes?")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await w.fake.user_message(w.general.id, w.alice, "hey Hermes, you there?")
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} ping")
        await settled(w, bot, 1)
        assert len(engine.prompts) == 1 and engine.prompts[0].rstrip().endswith(
            "alice: ping\n\n### Response:"
        )

        async def admin_set(name: str, value: str) -> None:
            handle = await w.fake.invoke_command(
                w.general.id, w.admin, "admin settings set",
                {"name": name, "value": value, "scope": "channel"},
            )  # fmt: skip
            text, _ = await answer(handle)
            assert f"`{name}` is now" in text, text

        await admin_set("wake_words", "on")
        await w.fake.user_message(w.general.id, w.alice, "hey HERMES, you there?")
        await settled(w, bot, 2)
        # a name inside another word is not a wake word; an extra word is, once configured
        await w.fake.user_message(w.general.id, w.bob, "Hermesian philosophy is odd")
        await admin_set("wake_extra", "barkeep, oi")
        await w.fake.user_message(w.general.id, w.bob, "Barkeep! Another round.")
        await settled(w, bot, 3)
        assert len(engine.prompts) == 3
        assert "bob: Barkeep! Another round." in engine.prompts[-1]
        assert "bob: Hermesian philosophy is odd" in engine.prompts[-1]  # stored, not answered
        # the active persona's name wakes it too
        await command(w, "persona use", {"name": "Sable"})
        await w.fake.user_message(w.general.id, w.bob, "sable, a case for you")
        posted = await settled(w, bot, 5)  # Sable's greeting, then her answer
        assert posted[-1].username == "Sable" and len(engine.prompts) == 4
        await admin_set("wake_words", "off")
        await w.fake.user_message(w.general.id, w.bob, "sable? barkeep?")
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} last")
        await settled(w, bot, 6)
        assert len(engine.prompts) == 5 and "alice: last" in engine.prompts[-1]


# ---- swipes -------------------------------------------------------------------------------


async def click(w: World, message: FakeMessage, action: str, user: FakeUser) -> InteractionHandle:
    current = w.fake.get_message(message.id)
    handle = await w.fake.click_button(current, custom_ids(current)[action]["custom_id"], user)
    await handle.wait_response(15)
    return handle


def shows(w: World, message: FakeMessage) -> tuple[str, str]:
    current = w.fake.get_message(message.id)
    return current.content, custom_ids(current)["count"]["label"]


async def test_swipes_three_alternatives_switching_who_may_and_a_restart(
    world: World, tmp_path: Path
) -> None:
    w = world
    settings = w.settings(tmp_path)
    engine = ScriptedEngine(["First take.", "Second take.", "Third take."])
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await command(w, "persona use", {"name": "Grumbold"})
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} mend this?")
        greeting, reply = await settled(w, bot, 2)
        assert not custom_ids(greeting)  # a greeting answers nobody: no swipes
        assert reply.username == "Grumbold" and shows(w, reply) == ("First take.", "1/1")
        assert custom_ids(reply)["prev"].get("disabled") and custom_ids(reply)["next"].get(
            "disabled"
        )

        await click(w, reply, "new", w.alice)
        await w.fake.wait_for(lambda: shows(w, reply) == ("Second take.", "2/2"))
        await click(w, reply, "new", w.alice)
        await w.fake.wait_for(lambda: shows(w, reply) == ("Third take.", "3/3"))
        seeds = [p.seed for p in engine.params[1:]]
        assert None not in seeds and len(set(seeds)) == 2  # each alternative has its own seed
        # the alternatives were generated from the same prompt, without the reply itself
        assert engine.prompts[1] == engine.prompts[2] == engine.prompts[0]

        await click(w, reply, "prev", w.alice)
        assert shows(w, reply) == ("Second take.", "2/3")
        # someone else may not swipe; nothing changes
        handle = await click(w, reply, "next", w.bob)
        assert await answer(handle) == (NOT_YOURS, True)
        assert shows(w, reply) == ("Second take.", "2/3")
        # a manager may
        await click(w, reply, "prev", w.admin)
        assert shows(w, reply) == ("First take.", "1/3")
        await click(w, reply, "next", w.alice)
        assert shows(w, reply) == ("Second take.", "2/3")
        stored = await bot.memory.turns.for_message(reply.id)
        assert stored is not None and stored.content == "Second take."

    # after a restart the buttons still work: the alternatives are in the database
    engine2 = ScriptedEngine(["Aye, done."])
    async with running_bot(w.fake, settings, engine=engine2) as bot:
        await click(w, reply, "next", w.alice)
        assert shows(w, reply) == ("Third take.", "3/3")
        # the one shown when the conversation moves on is what the next prompt holds
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} thanks")
        await settled(w, bot, 3)
        prompt = engine2.prompts[-1]
        assert "### Response:\nThird take.\n\n" in prompt
        assert "First take." not in prompt and "Second take." not in prompt
        # and the old reply is settled now
        handle = await click(w, reply, "prev", w.alice)
        assert await answer(handle) == (SETTLED, True)
        assert shows(w, reply) == ("Third take.", "3/3")


async def test_continue_settles_a_reply_and_regenerate_offers_fresh_swipes(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(["Once upon", "a time.", "Another tale."])
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} a story?")
        (reply,) = await settled(w, bot, 1)
        assert shows(w, reply) == ("Once upon", "1/1")
        assert await command(w, "continue") == "Continued."
        handle = await click(w, reply, "new", w.alice)
        assert await answer(handle) == (GONE, True)  # its versions would drop the continuation
        assert len(engine.prompts) == 2
        assert await command(w, "regenerate") == "Regenerated."
        await w.fake.wait_for(lambda: w.fake.get_message(reply.id).deleted)
        (fresh,) = await settled(w, bot, 1)
        assert shows(w, fresh) == ("Another tale.", "1/1")


async def test_a_scene_in_a_dm_speaks_with_bold_names_and_swipes_keep_them(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(lambda prompt: f"{speaker(prompt)} at your door.")
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        dm = w.fake.dm_channel(w.alice)
        for name in ("Grumbold", "Sable"):
            handle = await w.fake.invoke_command(
                dm.id, w.alice, "persona scene add", {"name": name}
            )
            assert "joins the scene" in (await answer(handle))[0]
        await w.fake.user_message(dm.id, w.alice, "Grumbold? Sable?")  # a DM answers always

        def posted() -> list[FakeMessage]:
            return [
                m
                for m in w.fake.channel_messages(dm.id)
                if m.author.id == w.fake.bot_user.id and m.interaction_metadata is None
            ]

        await w.fake.wait_for(lambda: len(posted()) >= 2 and bot.conv.pending == 0)
        first, second = posted()
        assert first.content == "**Grumbold:** Grumbold at your door."
        assert second.content == "**Sable:** Sable at your door."
        assert not w.fake.webhooks
        await click(w, second, "new", w.alice)
        await w.fake.wait_for(lambda: shows(w, second)[1] == "2/2")
        assert shows(w, second)[0] == "**Sable:** Sable at your door."
        stored = await bot.memory.turns.for_message(second.id)
        assert stored is not None and (stored.persona, stored.content) == (
            "Sable",
            "Sable at your door.",
        )


async def test_scene_replies_through_the_real_local_engine(
    world: World, tiny_model: Path, tmp_path: Path
) -> None:
    """The tiny model behind the local engine (continuous batching): two named members get a
    reply each, in order, under their own names."""
    w = world
    async with running_bot(w.fake, w.settings(tmp_path, tiny_model)) as bot:
        await cast_scene(w, ("MIRA", "Grumbold"))
        await w.fake.user_message(
            w.general.id, w.alice, f"{w.fake.bot_user.mention} grumbold, mira: status?"
        )
        posted = await settled(w, bot, 2, timeout=120)
        assert [m.username for m in posted] == ["Grumbold", "MIRA"]
        assert all(m.content.strip() for m in posted)


# ---- persona switch -----------------------------------------------------------------------


async def test_a_new_persona_sees_the_old_ones_replies_as_named_lines(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = ScriptedEngine(["I am Hermes, at your service.", "Hmph.", "Still Hmph."])
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} who are you?")
        await settled(w, bot, 1)
        await command(w, "persona use", {"name": "Grumbold"})
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} and now?")
        await settled(w, bot, 3)
        prompt = engine.prompts[-1]
        assert "### Instruction:\nHermes: I am Hermes, at your service.\n\n" in prompt
        assert "### Response:\nI am Hermes" not in prompt
        assert "\nHermes:" in engine.params[-1].stop
        # back to Hermes: Grumbold's lines are his, by name; Hermes's own reply is a Response
        await command(w, "persona off")
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} Hermes?")
        await settled(w, bot, 4)
        prompt = engine.prompts[-1]
        assert "### Response:\nI am Hermes, at your service.\n\n" in prompt
        assert "### Instruction:\nGrumbold: Hmph.\n\n" in prompt
        assert "### Response:\nHmph." not in prompt
