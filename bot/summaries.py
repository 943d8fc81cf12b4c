"""The rolling summary: what scrolled out of a channel's window, written by the model in the
background, never in a reply's way.

`Conversations.prepare` reports every prompt it builds (`Conversations.prompt_hooks`); when the
history was cut, the turns before the window's first one are "scrolled out". Once more than
`SUMMARY_AFTER` of them (the channel's setting) are not yet covered by the channel's summary,
the channel is due: the model is asked for an updated summary (the old one plus the oldest
uncovered turns that fit its window), stored with the range of turns it covers
(`bot.store.notes.SummaryStore`), and shown before recall in later prompts
(`bot.prompt_context`).

Low priority without an engine priority: a summary starts only while no reply is waiting or
being written (`Conversations.idle`), and the moment one is (`Conversations.busy`) the summary's
request is cancelled (the engine stops it within a step) and tried again when the bot is idle.
A reply is therefore never queued behind a summary. `/reset` (forget) and `/admin memory clear`
delete the summary; a summary finished after either is thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, replace

from bot.conversation import Conversations
from bot.engine import GenerationParams, params_from_settings
from bot.memory import Memory
from bot.prompt import Turn, clean_name, one_line, transcript_text
from bot.prompt_window import FittedPrompt, fit_prompt
from bot.settings import Settings
from bot.store.turns import StoredTurn

log = logging.getLogger(__name__)

#: What the model is asked to do (the system text of a summary's prompt).
SUMMARY_INSTRUCTION = (
    "You keep a running summary of a Discord conversation. Write the updated summary: what the "
    "summary so far says, plus what happens in the new messages, in a few short sentences of "
    "plain prose. Keep names, facts, decisions and open questions. Write only the summary."
)
SO_FAR = "The summary so far:"
NEW_MESSAGES = "New messages:"
#: Tokens kept free in a summary's prompt besides the summary itself (instruction, wrappers).
PROMPT_OVERHEAD = 96
#: Sampling for summaries: near-greedy, factual.
TEMPERATURE = 0.2
#: What one attempt at a channel's summary came to.
WROTE, INTERRUPTED, NOTHING = "wrote", "interrupted", "nothing"


@dataclass(slots=True)
class Due:
    """A channel whose window was cut: where the window starts, and its settings."""

    guild_id: int | None
    window_start: int
    settings: Settings


class Summarizer:
    """One background task that writes the channels' rolling summaries, one at a time."""

    def __init__(self, conv: Conversations) -> None:
        self.conv = conv
        self.memory = conv.memory
        self._due: dict[int, Due] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        conv.prompt_hooks.append(self.saw_prompt)

    # ---- being told ---------------------------------------------------------------------------

    def saw_prompt(
        self, channel_id: int, guild_id: int | None, prompt: FittedPrompt, settings: Settings
    ) -> None:
        """A prompt was built: if its history was cut, the channel may be due a summary."""
        if not settings.summary_after or not prompt.older or prompt.start_id is None:
            return
        self._due[channel_id] = Due(guild_id, prompt.start_id, settings)
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="summaries")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ---- working ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._due:
                channel_id, due = next(iter(self._due.items()))
                await self.conv.idle.wait()
                if self._due.get(channel_id) is not due:  # a newer window came meanwhile
                    continue
                try:
                    outcome = await self.summarize(channel_id, due)
                except Exception:  # a failing model or a closed database: next time it is due
                    log.exception("summary of channel %s failed", channel_id)
                    outcome = NOTHING
                if outcome == NOTHING and self._due.get(channel_id) is due:
                    del self._due[channel_id]  # WROTE: look again (more may be due)

    async def uncovered(self, channel_id: int, before_id: int) -> tuple[int, list[StoredTurn]]:
        """The floor (forget watermark or the summary's end) and the visible turns after it
        and before `before_id`, oldest first."""
        floor = await self.memory.turns.watermark(channel_id)
        summary = await self.memory.summaries.get(channel_id)
        after = max(floor, summary.last_id if summary else 0)
        return floor, await self.memory.turns.between(channel_id, after, before_id)

    async def summarize(self, channel_id: int, due: Due) -> str:
        """Write one summary if the channel is due one: WROTE, INTERRUPTED (a reply started
        waiting; the channel stays due) or NOTHING (not due, or nothing usable came)."""
        floor, turns = await self.uncovered(channel_id, due.window_start)
        if len(turns) < due.settings.summary_after:
            return NOTHING
        old = await self.memory.summaries.get(channel_id)
        prompt, covered = self._prompt(old.text if old else "", turns, due.settings)
        params = self._params(due.settings, covered)
        fmt = self.conv.fmt
        extra = {"messages": fmt.messages(prompt)} if fmt.name == "server" else {}
        gen = self.conv.engine.generate(
            prompt.text, params, cache_key=f"summary:{channel_id}", **extra
        )
        if not await self._finished(gen):
            log.info("summary of channel %s yielded to a reply; tried again later", channel_id)
            return INTERRUPTED
        text = self.conv.fmt.clean(gen.text, self._names(covered), "")
        if not text:
            log.info("the model wrote an empty summary for channel %s", channel_id)
            return NOTHING
        now = await self.memory.summaries.get(channel_id)
        if await self.memory.turns.watermark(channel_id) != floor or now != old:
            return NOTHING  # forgotten, cleared or replaced meanwhile: this one is stale
        first = old.first_id if old else covered[0].id
        await self.memory.summaries.put(channel_id, text, first, covered[-1].id)
        log.info("summary of channel %s covers turns %d-%d", channel_id, first, covered[-1].id)
        return WROTE

    async def _finished(self, gen: object) -> bool:
        """Read `gen` to its end unless a reply starts waiting first (then cancel it)."""
        reading = asyncio.ensure_future(gen.text_all())  # type: ignore[attr-defined]
        busy = asyncio.ensure_future(self.conv.busy.wait())
        try:
            await asyncio.wait({reading, busy}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            busy.cancel()
        if reading.done():
            reading.result()  # an engine error is raised here
            return True
        gen.cancel()  # type: ignore[attr-defined]
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading
        return False

    # ---- the request --------------------------------------------------------------------------

    def _names(self, turns: list[StoredTurn]) -> list[str]:
        return [t.name or self.conv.bot_name for t in turns]

    def _prompt(
        self, old: str, turns: list[StoredTurn], settings: Settings
    ) -> tuple[FittedPrompt, list[StoredTurn]]:
        """The summary's prompt and the turns it covers: the oldest uncovered turns that fit
        beside the summary so far and the summary to be written."""
        count = self.conv.counter
        system = SUMMARY_INSTRUCTION + (f"\n\n{SO_FAR}\n{old}" if old.strip() else "")
        room = int(settings.context_tokens) - settings.summary_tokens - PROMPT_OVERHEAD
        room -= count(system)
        covered: list[StoredTurn] = []
        used = 0
        for turn in turns:
            cost = count(f"{clean_name(turn.name)}: {one_line(turn.content)}") + 2
            if covered and used + cost > room:
                break
            covered.append(turn)
            used += cost
        bot = self.conv.bot_name
        shown = [
            Turn(t.role, t.content, t.name or (bot if t.role == "assistant" else ""))
            for t in covered
        ]
        ask = Turn("user", f"{NEW_MESSAGES}\n{transcript_text(shown)}")
        budget = int(settings.context_tokens) - settings.summary_tokens
        return fit_prompt(system, [], ask, count, budget), covered

    def _params(self, settings: Settings, covered: list[StoredTurn]) -> GenerationParams:
        return replace(
            params_from_settings(settings),
            max_new_tokens=settings.summary_tokens,
            temperature=min(settings.temperature, TEMPERATURE),
            stop=tuple(self.conv.fmt.stops(self._names(covered))),
            stop_ids=self.conv.fmt.end_ids,
        )


# ---- /admin memory summary ---------------------------------------------------------------------

#: The longest summary an admin may write (`/admin memory summary text:`), in characters.
SUMMARY_MAX_CHARS = 4000


async def describe(memory: Memory, channel_id: int) -> str:
    """The channel's summary and the turns it covers, for `/admin memory summary`."""
    summary = await memory.summaries.get(channel_id)
    if summary is None:
        return "No summary here yet: one is written once enough turns scroll out of the window."
    return (
        f"Summary of turns #{summary.first_id}–#{summary.last_id} "
        f"(updated <t:{int(summary.updated_at)}:R>):\n{summary.text}"
    )


async def replace_summary(memory: Memory, channel_id: int, text: str) -> str:
    """An admin's summary in place of the channel's: it keeps the range the old one covered,
    or covers every visible turn so far when there was none. Returns the one-line answer."""
    old = await memory.summaries.get(channel_id)
    if old is not None:
        first, last = old.first_id, old.last_id
    elif (span := await memory.turns.span(channel_id)) is not None:
        first, last = span
    else:
        return "There is nothing here to summarise yet."
    await memory.summaries.put(channel_id, text, first, last)
    return f"The summary of turns #{first}–#{last} is replaced."
