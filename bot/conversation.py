"""One channel's conversation: store turns, order replies, build the request, clean the answer.

The console and the Discord cogs both go through here, so a channel behaves the same wherever
the message came from. Which persona and settings a channel uses comes from the channel policy
(`bot.policy`). `Conversations` also holds the engine in use (`set_engine` swaps it). Nothing in
this module knows about discord.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bot.engine import (
    Engine,
    EngineError,
    Generation,
    GenerationParams,
    ReplyStats,
    params_from_settings,
)
from bot.memory import Memory
from bot.personas import (
    DEFAULT_PERSONA,
    Persona,
    PersonaLibrary,
    build_persona_prompt,
    persona_key,
)
from bot.policy import Place, resolve
from bot.prompt import (
    FittedPrompt,
    TokenCounter,
    Turn,
    fit_prompt,
    other_speakers,
    seen_by,
    with_recall,
)
from bot.prompt_template import ALPACA, AlpacaFormat, TemplateError, TemplateFormat, choose_format
from bot.recall import recall
from bot.settings import Settings

log = logging.getLogger(__name__)

EMPTY_NOTICE = "*(I had nothing to say to that. Try rephrasing?)*"


class Busy(RuntimeError):
    """Too many replies are already waiting; tell the user to try again shortly."""


@dataclass(slots=True)
class ReplyJob:
    """Everything needed to generate and store one reply."""

    channel_id: int
    guild_id: int | None
    prompt: FittedPrompt
    params: GenerationParams
    other_names: list[str]
    bot_name: str
    persona: str | None
    reply_to: int | None  # turn id of the message being answered
    cache_key: str = ""  # the engine's prompt-cache slot; one per channel and speaker
    text: str = ""
    stats: ReplyStats | None = None
    notes: list[str] = field(default_factory=list)


def reopen_last_reply(prompt: FittedPrompt, fmt: AlpacaFormat | TemplateFormat = ALPACA) -> bool:
    """Make `prompt` continue its last reply instead of asking for a new one; False if the
    last turn is not the bot's.

    Drops the reply's end and the next reply's opening (Alpaca: "\\n\\n### Response:\\n"; a
    template: its end-of-turn token and generation prompt), so the model writes on from the
    reply's last word, the assistant message left open.
    """
    tail = fmt.reply_end + fmt.reply_open
    if not (prompt.turns and prompt.turns[-1].role == "assistant" and prompt.text.endswith(tail)):
        return False
    prompt.text = prompt.text[: -len(tail)]
    return True


class Conversations:
    """Stores a channel's turns, orders its replies and builds and runs its requests."""

    def __init__(
        self,
        settings: Settings,
        memory: Memory,
        engine: Engine,
        *,
        bot_name: str = "Hermes",
        personas: PersonaLibrary | None = None,
    ) -> None:
        self.settings = settings
        self.memory = memory
        self.engine = engine
        self.bot_name = bot_name
        self.personas = personas
        self.fmt = self._format(engine)
        self.counter = TokenCounter(engine.count_tokens, self.fmt)
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._start_hint: dict[tuple[int, str], int | None] = {}
        self.pending = 0
        self.recent: deque[ReplyStats] = deque(maxlen=50)  # for /admin model status

    def set_engine(self, engine: Engine) -> None:
        # the reply watchers (metrics) move with the engine: hooks belong to an engine instance
        old = [h for h in self.engine.finish_hooks if h not in engine.finish_hooks]
        engine.finish_hooks.extend(old)
        self.fmt = self._format(engine)
        self.engine = engine
        self.counter = TokenCounter(engine.count_tokens, self.fmt)
        self._start_hint.clear()

    def _format(self, engine: Engine) -> AlpacaFormat | TemplateFormat:
        """The prompt format for `engine`'s model (`PROMPT_FORMAT`), decided once per model."""
        try:
            fmt = choose_format(self.settings.prompt_format, engine.tokenizer)
        except TemplateError as exc:
            raise EngineError(str(exc)) from None
        if fmt.name == "server" and not engine.takes_messages:
            raise EngineError(
                "PROMPT_FORMAT=server sends role messages to a chat endpoint: it needs "
                "ENGINE=openai; use auto, alpaca or chat_template with this engine"
            )
        log.info("prompt format: %s", fmt.describe())
        return fmt

    # ---- storing ----------------------------------------------------------------------------

    async def record_user(
        self,
        channel_id: int,
        content: str,
        *,
        name: str,
        author_id: int | None = None,
        guild_id: int | None = None,
        message_id: int | None = None,
        awaiting: bool = False,
    ) -> int:
        """Store a member's turn; `awaiting`: the bot owes it a reply (see Memory.add_turn)."""
        return await self.memory.add_turn(
            channel_id,
            "user",
            content,
            name=name,
            author_id=author_id,
            guild_id=guild_id,
            message_id=message_id,
            tokens=self.counter(content.strip()),
            awaiting=awaiting,
        )

    async def record_assistant(
        self,
        channel_id: int,
        content: str,
        *,
        guild_id: int | None = None,
        message_ids: list[int] | None = None,
        persona: str | None = None,
        name: str = "",
        answers: int | None = None,
    ) -> int:
        """Store the bot's turn; `answers`: the user turn it answers, no longer owed a reply."""
        ids = message_ids or []
        return await self.memory.add_turn(
            channel_id,
            "assistant",
            content,
            name=name,
            guild_id=guild_id,
            message_id=ids[0] if ids else None,
            extra_message_ids=ids[1:],
            persona=persona,
            tokens=self.counter(content.strip()),
            answers=answers,
        )

    async def edit(self, message_id: int, content: str) -> bool:
        return await self.memory.edit_message(message_id, content, self.counter(content.strip()))

    # ---- ordering ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, channel_id: int) -> AsyncIterator[None]:
        """Wait for this channel's turn: one reply at a time per channel, in arrival order.

        asyncio.Lock wakes waiters first-in first-out, which gives arrival order per channel
        while other channels proceed. Raises Busy when the bounded queue is full.
        """
        if self.pending >= self.settings.queue_size:
            raise Busy
        self.pending += 1
        try:
            async with self._locks[channel_id]:
                yield
        finally:
            self.pending -= 1

    # ---- building ---------------------------------------------------------------------------

    async def prepare(
        self,
        channel_id: int,
        guild_id: int | None = None,
        *,
        reply_to: int | None = None,
        persona: str | None = None,
        overrides: dict[str, Any] | None = None,
        continue_last: bool = False,
        parent_id: int | None = None,
        cast: Sequence[str] = (),
        scene: str = "",
        skip: int | None = None,
    ) -> ReplyJob | None:
        """Build the request for the next reply from what memory holds now.

        Reading memory at this point (not when the message arrived) means an edit made while the
        message waited is used as edited, and a deleted message is not answered (None). A thread
        (`parent_id` set) has its own memory but takes its parent's persona and settings unless
        it has its own (the channel policy decides). `continue_last` reopens the last reply
        instead (None when it is no longer the latest turn).

        Replies by another persona than the one speaking are shown as that persona's named
        lines (`bot.prompt.seen_by`), never as its own turns. In a scene, `cast` are the other
        members (each one a stop) and `scene` the roster and scenario for the Input block;
        `skip` leaves one stored reply out (the one a swipe replaces).
        """
        policy = await resolve(self.memory, self.settings, Place(channel_id, guild_id, parent_id))
        settings = policy.settings.applied(self.settings)
        recall_budget = self.recall_budget(settings)
        # the history's share of the window; recalled turns take the rest
        budget = int(settings.context_tokens) - int(settings.max_new_tokens) - recall_budget
        found = await self._history(channel_id, budget, reply_to, skip)
        if found is None:
            return None
        history, current = found
        chosen = await self._persona(persona if persona is not None else policy.persona, guild_id)
        bot_name = chosen.name if chosen else self.bot_name
        history = seen_by(history, bot_name)
        prompt = self._fit(chosen, history, current, budget, (channel_id, bot_name), scene)
        if recall_budget and prompt.older:
            prompt = await self._recall(channel_id, guild_id, prompt, recall_budget, bot_name)
        if continue_last and not reopen_last_reply(prompt, self.fmt):
            return None
        speakers = [*(t.name for t in prompt.turns if t.role == "user"), *cast]
        names = sorted(other_speakers(speakers, bot_name))
        params = replace(
            params_from_settings(settings),
            stop=tuple(self.fmt.stops(names)),
            stop_ids=self.fmt.end_ids,
            **(overrides or {}),
        )
        return ReplyJob(
            channel_id,
            guild_id,
            prompt,
            params,
            names,
            bot_name,
            chosen.name if chosen else None,
            reply_to,
            cache_key=f"{channel_id}:{bot_name}" if cast else str(channel_id),
            notes=list(prompt.notes),
        )

    async def _history(
        self, channel_id: int, budget: int, reply_to: int | None, skip: int | None = None
    ) -> tuple[list[Turn], Turn | None] | None:
        """The turns before the one being answered, and that turn; None if it was deleted.

        Human messages that arrived after `reply_to` wait for their own reply; the bot's replies
        to earlier messages belong before it even when stored later.
        """
        turns = await self.memory.recent_turns(channel_id, token_budget=budget)
        turns = [t for t in turns if t.id != skip]
        if reply_to is None:
            return [t.to_turn() for t in turns], None
        found = [t for t in turns if t.id == reply_to]
        if not found:
            return None
        history = [
            t.to_turn()
            for t in turns
            if t.id != reply_to and (t.id < reply_to or t.role == "assistant")
        ]
        return history, found[0].to_turn()

    async def _persona(self, name: str | None, guild_id: int | None) -> Persona | None:
        """The persona to play; None for the default assistant, whatever its persona file says
        (it uses the plain SYSTEM_PROMPT layout)."""
        if not name or persona_key(name) == persona_key(DEFAULT_PERSONA) or not self.personas:
            return None
        return await self.personas.get(name, guild_id)

    def _fit(
        self,
        chosen: Persona | None,
        history: list[Turn],
        current: Turn | None,
        budget: int,
        slot: tuple[int, str],
        scene: str = "",
    ) -> FittedPrompt:
        """The prompt text fitted to `budget`, starting where the last one did when it can
        (remembered per channel and speaker: `slot`)."""
        hint = self._start_hint.get(slot)
        slack = self.settings.fit_slack
        if chosen is not None:
            speaker = current.name if current else ""
            prompt = build_persona_prompt(
                chosen,
                history,
                current,
                speaker,
                self.counter,
                budget,
                start_hint=hint,
                slack=slack,
                scene=scene,
            )
        else:
            prompt = fit_prompt(
                "\n\n".join(filter(None, [self.settings.system_text(self.fmt.templated), scene])),
                history,
                current,
                self.counter,
                budget,
                start_hint=hint,
                slack=slack,
                speakers=[self.bot_name],
            )
        self._start_hint[slot] = prompt.start_id
        return prompt

    def recall_budget(self, settings: Settings) -> int:
        """Tokens of the window set aside for recalled turns (`settings` as this channel has
        them): 0 when recall is off here or the SQLite build has no full-text index."""
        if not (settings.recall and self.memory.fts):
            return 0
        return settings.recall_tokens or int(settings.context_tokens) // 10

    async def _recall(
        self,
        channel_id: int,
        guild_id: int | None,
        prompt: FittedPrompt,
        budget: int,
        bot_name: str,
    ) -> FittedPrompt:
        """Add the turns from before the window that best match the latest messages."""
        users = [t for t in prompt.turns if t.role == "user"]
        query = [t.content for t in reversed(prompt.turns[-3:])]
        if users and users[-1].content not in query:
            query.insert(0, users[-1].content)
        oldest = prompt.start_id if prompt.start_id is not None else prompt.turns[-1].id
        blocked = (await self.memory.blocked(guild_id))[0] if guild_id else set()
        found = await recall(
            self.memory,
            channel_id,
            query,
            before_id=oldest,
            budget_tokens=budget,
            window=[t.content for t in prompt.turns[:-1]],
            exclude_authors=blocked,
        )
        return with_recall(prompt, [t.to_turn() for t in found], self.counter, bot_name)

    # ---- generating -------------------------------------------------------------------------

    async def stream(self, job: ReplyJob) -> AsyncIterator[str]:
        """Yield the cleaned reply as it grows; `job.text` holds the final text afterwards.

        An empty result gets one retry with a fresh seed, then a short notice, never an empty
        message.
        """
        for attempt in range(2):
            params = (
                job.params
                if attempt == 0
                else replace(
                    job.params,
                    seed=random.randrange(1 << 30),
                    temperature=max(job.params.temperature, 0.7),
                )
            )
            # role messages only for PROMPT_FORMAT=server (engines with `takes_messages`)
            extra = {"messages": self.fmt.messages(job.prompt)} if self.fmt.name == "server" else {}
            gen: Generation = self.engine.generate(
                job.prompt.text, params, cache_key=job.cache_key or str(job.channel_id), **extra
            )
            job.stats = gen.stats
            shown = ""
            async for _ in gen:
                text = self.fmt.clean(gen.text, job.other_names, job.bot_name)
                if text and text != shown:
                    shown = text
                    yield text
            self.recent.append(gen.stats)
            job.text = self.fmt.clean(gen.text, job.other_names, job.bot_name)
            if job.text:
                return
            log.info("empty reply in channel %s (attempt %d)", job.channel_id, attempt + 1)
        job.text = EMPTY_NOTICE
        yield job.text

    async def complete(self, job: ReplyJob) -> str:
        async for _ in self.stream(job):
            pass
        return job.text
