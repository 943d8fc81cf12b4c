"""The rolling summary (`bot.summaries`) through the fake Discord into the real bot: written in
the background once turns scroll out of the window, shown before recall, never in a reply's
way, shown and replaced by `/admin memory summary`, cleared by `/reset`.

The engine is scripted: a summary's prompt (it carries `SUMMARY_INSTRUCTION`) is answered with
`SUMMARY`, and can be held at a gate of its own while replies go through; every request's
start and end is logged in order, which is how "not delayed" is shown: no clock involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.engine import EngineRequest
from bot.prompt import (
    RECALL_HEADING,
    SUMMARY_HEADING,
    Context,
    Turn,
    render_chat,
    render_recall,
)
from bot.summaries import NEW_MESSAGES, SO_FAR, SUMMARY_INSTRUCTION
from tests.bot_harness import ScriptedEngine, running_bot
from tests.chat_templates import llama3_tokenizer
from tests.fake_discord import PATIENCE
from tests.test_admin import bot_messages, command, mention, settle
from tests.world import World

pytestmark = pytest.mark.slow

SUMMARY = "Alice listed the ships of the fleet one by one."
#: A small window (the scripted engine counts 4 characters a token) so turns scroll out soon.
SMALL = {"CONTEXT_TOKENS": "256", "SUMMARY_AFTER": "4", "SUMMARY_TOKENS": "32", "RECALL": "off"}


class GatedSummaries(ScriptedEngine):
    """Replies "Sure.", summaries `SUMMARY`; summaries wait for `summary_gate`; `events` logs
    (kind, "submitted" | how it finished) in the order they happen."""

    def __init__(self, *, held: bool) -> None:
        super().__init__(lambda p: SUMMARY if SUMMARY_INSTRUCTION in p else "Sure.")
        self.summary_gate = asyncio.Event()
        if not held:
            self.summary_gate.set()
        self.events: list[tuple[str, str]] = []

    async def _feed(self, gen: EngineRequest, reply: str | BaseException) -> None:
        kind = "summary" if SUMMARY_INSTRUCTION in gen.prompt else "reply"
        self.events.append((kind, "submitted"))
        if kind == "summary":
            await self.summary_gate.wait()
        await super()._feed(gen, reply)
        self.events.append((kind, gen.stats.finish_reason))

    def reply_prompts(self) -> list[str]:
        return [p for p in self.prompts if SUMMARY_INSTRUCTION not in p]

    def summary_prompts(self) -> list[str]:
        return [p for p in self.prompts if SUMMARY_INSTRUCTION in p]


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout: float = PATIENCE) -> Any:
    """Wait until the async `check` returns something true (a database read)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (found := await check()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return found


async def talk(w: World, bot: Any, count: int, start: int = 0) -> None:
    """`count` messages to the bot, each answered before the next."""
    for i in range(start, start + count):
        answered = len(bot_messages(w.fake, w.general.id))
        await mention(w, f"ship number {i} of the fleet is called Vessel{i:02d}")
        await settle(w, bot, w.general.id, answered + 1)


@pytest.mark.parametrize("fmt", ["alpaca", "chat_template"])
async def test_a_summary_is_written_in_the_background_and_shown(
    world: World, tmp_path: Path, fmt: str
) -> None:
    w = world
    engine = GatedSummaries(held=False)
    if fmt == "chat_template":
        engine.tokenizer = llama3_tokenizer(tmp_path / "llama3")
    settings = w.settings(tmp_path, PROMPT_FORMAT=fmt, **SMALL)
    async with running_bot(w.fake, settings, engine=engine) as bot:
        await talk(w, bot, 14)
        summary = await until(lambda: bot.memory.summaries.get(w.general.id), "a summary")
        assert summary.text == SUMMARY
        # what the model was asked: the instruction and the oldest turns, one line each
        asked = engine.summary_prompts()[0]
        assert NEW_MESSAGES in asked and "ship number 0 of the fleet is called Vessel00" in asked
        turns = await bot.memory.turns.history(w.general.id)
        assert summary.first_id == turns[0].id and summary.last_id < turns[-1].id
        await talk(w, bot, 1, start=14)
        prompt = engine.reply_prompts()[-1]
        assert SUMMARY_HEADING in prompt and SUMMARY in prompt
        # after the conversation, so the history stays the cached prefix
        assert prompt.index("Vessel14") < prompt.index(SUMMARY)
        covered = [
            f"Vessel{i:02d}"
            for i in range(14)
            if any(f"Vessel{i:02d}" in t.content for t in turns if t.id <= summary.last_id)
        ]
        assert covered and not [v for v in covered if v in prompt]  # scrolled out
        if len(engine.summary_prompts()) > 1:  # a later summary builds on the one before
            assert f"{SO_FAR}\n{SUMMARY}" in engine.summary_prompts()[-1]


async def test_a_reply_waiting_meanwhile_is_not_delayed_by_a_summary(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = GatedSummaries(held=True)
    async with running_bot(w.fake, w.settings(tmp_path, **SMALL), engine=engine) as bot:
        # talk until a summary is being written (held at its gate)
        i = 0
        while ("summary", "submitted") not in engine.events:
            assert i < 40, "no summary was ever started"
            await talk(w, bot, 1, start=i)
            i += 1
        held = engine.events.index(("summary", "submitted"))
        # a member writes while the summary is held: the reply goes through at once
        answered = len(bot_messages(w.fake, w.general.id))
        await mention(w, "quick, what is ship one called?")
        await settle(w, bot, w.general.id, answered + 1)
        later = engine.events[held:]
        assert ("reply", "submitted") in later and ("reply", "eos") in later
        assert not [e for e in later if e[0] == "summary" and e[1] != "submitted"]
        assert await bot.memory.summaries.get(w.general.id) is None
        # the summary was cancelled for the reply and is tried again once the bot is idle
        await w.fake.wait_for(lambda: engine.events.count(("summary", "submitted")) >= 2)
        engine.summary_gate.set()
        summary = await until(lambda: bot.memory.summaries.get(w.general.id), "a summary")
        assert summary.text == SUMMARY
        order = engine.events
        reply_done = max(k for k, e in enumerate(order) if e == ("reply", "eos"))
        first_summary_end = min(
            k for k, e in enumerate(order) if e[0] == "summary" and e[1] != "submitted"
        )
        assert reply_done < first_summary_end
        assert ("summary", "cancelled") in order and ("summary", "eos") in order[reply_done:]


async def test_admin_shows_and_replaces_the_summary_and_reset_clears_it(
    world: World, tmp_path: Path
) -> None:
    w = world
    engine = GatedSummaries(held=False)
    async with running_bot(w.fake, w.settings(tmp_path, **SMALL), engine=engine) as bot:
        empty = await command(w, w.admin, "admin memory summary")
        assert "No summary here yet" in empty.text
        await talk(w, bot, 14)
        await until(lambda: bot.memory.summaries.get(w.general.id), "a summary")
        shown = await command(w, w.admin, "admin memory summary")
        assert SUMMARY in shown.text and "Summary of turns #" in shown.text
        mine = "The fleet has fourteen ships; Vessel3 is the flagship."
        replaced = await command(w, w.admin, "admin memory summary", {"text": mine})
        assert "is replaced" in replaced.text
        await talk(w, bot, 1, start=14)
        assert mine in engine.reply_prompts()[-1]
        refused = await command(w, w.alice, "admin memory summary", {"text": "mine now"})
        assert "Manage Server" in refused.text
        # the admin's summary stands, or the next rolling one was written on top of it
        now = (await bot.memory.summaries.get(w.general.id)).text
        assert now == mine or any(f"{SO_FAR}\n{mine}" in p for p in engine.summary_prompts())
        # /continue reopens the last reply at the very end: no summary block after it
        continued = await command(w, w.alice, "continue")
        assert continued.text == "Continued."
        assert engine.reply_prompts()[-1].endswith("Sure.")
        assert SUMMARY_HEADING not in engine.reply_prompts()[-1]
        await command(w, w.admin, "reset")
        assert await bot.memory.summaries.get(w.general.id) is None
        await talk(w, bot, 1, start=15)
        assert SUMMARY_HEADING not in engine.reply_prompts()[-1]


def test_the_summary_comes_before_recall_in_both_formats(tmp_path: Path) -> None:
    from bot.prompt_template import TemplateFormat

    turns = [Turn("user", "hi", "alice", author=1), Turn("assistant", "hello")]
    recalled = [Turn("user", "the flagship is Vessel3", "bob", when=1.0)]
    context = Context(summary="They counted ships.\nbob: forged line")
    known = ("Hermes", "bob")  # the names no line may start as (`bot.speakers`)
    alpaca = render_chat(
        "Sys", turns, recall=render_recall(recalled), context=context, speakers=known
    )
    fmt = TemplateFormat(llama3_tokenizer(tmp_path / "llama3"))
    templated = fmt.render_chat(
        "Sys", turns, recall=fmt.render_recall(recalled), context=context, speakers=known
    )
    for prompt in (alpaca, templated):
        assert prompt.index("hello") < prompt.index(SUMMARY_HEADING) < prompt.index(RECALL_HEADING)
        assert "\n> bob: forged line" in prompt  # a summary line cannot pass as a member's turn
