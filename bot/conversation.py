"""One channel's conversation: store turns, order replies, build the request, clean the answer.

The console and the Discord cogs both go through here, so a channel behaves the same wherever
the message came from. Nothing in this module knows about discord.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from bot.engine import Engine, Generation, GenerationParams, ReplyStats, params_from_settings
from bot.memory import ChannelState, GuildState, Memory
from bot.personas import DEFAULT_PERSONA, PersonaLibrary, build_persona_prompt, persona_key
from bot.prompt import (
    RESPONSE,
    SEPARATOR,
    FittedPrompt,
    TokenCounter,
    Turn,
    clean_reply,
    fit_prompt,
    stop_strings,
)
from bot.settings import Settings

log = logging.getLogger(__name__)

#: Generation settings an admin may override per server or channel, with their allowed ranges.
TUNABLE: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "top_k": (int, 0, 200),
    "repetition_penalty": (float, 1.0, 2.0),
    "max_new_tokens": (int, 16, 2048),
    "context_tokens": (int, 512, 32768),
}

EMPTY_NOTICE = "*(I had nothing to say to that. Try rephrasing?)*"


class Busy(RuntimeError):
    """Too many replies are already waiting; tell the user to try again shortly."""


def check_tunable(name: str, raw: str) -> float | int:
    """Parse and range-check an admin-supplied value; ValueError names the allowed range."""
    if name not in TUNABLE:
        raise ValueError(f"unknown setting {name!r}; choose one of {', '.join(TUNABLE)}")
    kind, lo, hi = TUNABLE[name]
    try:
        value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        raise ValueError(
            f"{name} must be {'a whole number' if kind is int else 'a number'} from {lo:g} to {hi:g}"
        ) from None
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} (got {raw})")
    return value


@dataclass(slots=True)
class Effective:
    """Generation settings in force for one channel, and where each came from."""

    values: dict[str, Any]
    source: dict[str, str]


def effective_settings(
    settings: Settings,
    guild: GuildState | None,
    channel: ChannelState,
    parent: ChannelState | None = None,
) -> Effective:
    """Defaults, then the server's, then a thread's parent channel's, then the channel's own."""
    values = {name: getattr(settings, name) for name in TUNABLE}
    source = dict.fromkeys(TUNABLE, "default")
    for scope, overrides in (
        ("server", guild.settings if guild else {}),
        ("parent channel", parent.settings if parent else {}),
        ("channel", channel.settings),
    ):
        for name, value in overrides.items():
            if name in TUNABLE:
                values[name], source[name] = value, scope
    return Effective(values, source)


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
    text: str = ""
    stats: ReplyStats | None = None
    notes: list[str] = field(default_factory=list)


class Conversations:
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
        self.counter = TokenCounter(engine.count_tokens)
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._start_hint: dict[int, int | None] = {}
        self.pending = 0
        self.recent: deque[ReplyStats] = deque(maxlen=50)  # for /admin model status

    def set_engine(self, engine: Engine) -> None:
        # the reply watchers (metrics) move with the engine: hooks belong to an engine instance
        old = [h for h in self.engine.finish_hooks if h not in engine.finish_hooks]
        engine.finish_hooks.extend(old)
        self.engine = engine
        self.counter = TokenCounter(engine.count_tokens)
        self._start_hint.clear()

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
    ) -> int:
        return await self.memory.add_turn(
            channel_id,
            "user",
            content,
            name=name,
            author_id=author_id,
            guild_id=guild_id,
            message_id=message_id,
            tokens=self.counter(content.strip()),
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
    ) -> int:
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
    ) -> ReplyJob | None:
        """Build the request for the next reply from what memory holds now.

        Reading memory at this point (not when the message arrived) means an edit made while the
        message waited is used as edited, and a deleted message is not answered (None). A thread
        (`parent_id` set) has its own memory but takes its parent's persona and settings unless
        it has its own.
        """
        channel = await self.memory.channel(channel_id)
        parent = await self.memory.channel(parent_id) if parent_id else None
        guild = await self.memory.guild(guild_id) if guild_id else None
        eff = effective_settings(self.settings, guild, channel, parent).values
        budget = int(eff["context_tokens"]) - int(eff["max_new_tokens"])
        turns = await self.memory.recent_turns(channel_id, token_budget=budget)
        current: Turn | None = None
        if reply_to is not None:
            found = [t for t in turns if t.id == reply_to]
            if not found:
                return None
            current = found[0].to_turn()
            # Human messages that arrived after this one wait for their own reply; the bot's
            # replies to earlier messages belong before it even when stored later.
            history = [
                t.to_turn()
                for t in turns
                if t.id != reply_to and (t.id < reply_to or t.role == "assistant")
            ]
        else:
            history = [t.to_turn() for t in turns]
        persona_name = (
            persona
            if persona is not None
            else channel.persona
            or (parent.persona if parent else None)
            or (guild.default_persona if guild else None)
        )
        # The default assistant is the plain SYSTEM_PROMPT layout, whatever its persona file says.
        chosen = None
        if persona_name and persona_key(persona_name) != persona_key(DEFAULT_PERSONA):
            chosen = await self.personas.get(persona_name, guild_id) if self.personas else None
        speaker = current.name if current else ""
        hint = self._start_hint.get(channel_id)
        if chosen is not None:
            prompt = build_persona_prompt(
                chosen,
                history,
                current,
                speaker,
                self.counter,
                budget,
                start_hint=hint,
                slack=self.settings.fit_slack,
            )
            bot_name, persona_name = chosen.name, chosen.name
        else:
            prompt = fit_prompt(
                self.settings.system_prompt,
                history,
                current,
                self.counter,
                budget,
                start_hint=hint,
                slack=self.settings.fit_slack,
            )
            bot_name, persona_name = self.bot_name, None
        self._start_hint[channel_id] = prompt.start_id
        if continue_last:
            # Reopen the last reply instead of asking for a new one: drop the trailing
            # "\n\n### Response:\n" so the model writes on from the reply's last word.
            tail = SEPARATOR + RESPONSE
            if not (
                prompt.turns and prompt.turns[-1].role == "assistant" and prompt.text.endswith(tail)
            ):
                return None
            prompt.text = prompt.text[: -len(tail)]
        names = sorted({t.name for t in prompt.turns if t.role == "user" and t.name} - {bot_name})
        params = params_from_settings(
            self.settings,
            **{
                k: eff[k]
                for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
            },
        )
        params = replace(params, stop=tuple(stop_strings(names)), **(overrides or {}))
        return ReplyJob(
            channel_id,
            guild_id,
            prompt,
            params,
            names,
            bot_name,
            persona_name,
            reply_to,
            notes=list(prompt.notes),
        )

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
            gen: Generation = self.engine.generate(
                job.prompt.text, params, cache_key=str(job.channel_id)
            )
            job.stats = gen.stats
            shown = ""
            async for _ in gen:
                text = clean_reply(gen.text, job.other_names, job.bot_name)
                if text and text != shown:
                    shown = text
                    yield text
            self.recent.append(gen.stats)
            job.text = clean_reply(gen.text, job.other_names, job.bot_name)
            if job.text:
                return
            log.info("empty reply in channel %s (attempt %d)", job.channel_id, attempt + 1)
        job.text = EMPTY_NOTICE
        yield job.text

    async def complete(self, job: ReplyJob) -> str:
        async for _ in self.stream(job):
            pass
        return job.text
