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
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from bot.engine import (
    Engine,
    EngineError,
    EngineRequest,
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
    INPUT,
    NO_CONTEXT,
    RECALL_HEADING,
    SEPARATOR,
    Context,
    Turn,
    other_speakers,
    recall_line,
    seen_by,
)
from bot.prompt_context import channel_notes, prompt_context
from bot.prompt_template import AlpacaFormat, TemplateError, TemplateFormat, choose_format
from bot.prompt_window import BLOCK_MARGIN, FittedPrompt, TokenCounter, fit_prompt, with_recall
from bot.recall import recall, recall_tokens
from bot.reply_job import ReplyJob, reopen_last_reply
from bot.settings import Settings
from bot.speakers import KnownNames, Member
from bot.store.turns import StoredTurn

log = logging.getLogger(__name__)

EMPTY_NOTICE = "*(I had nothing to say to that. Try rephrasing?)*"
#: What a recall block costs besides its lines (`bot.prompt.render_recall`).
RECALL_BLOCK_HEAD = f"{INPUT}{RECALL_HEADING}\n{SEPARATOR}"


class Busy(RuntimeError):
    """Too many replies are already waiting; tell the user to try again shortly."""


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
        members: Callable[[int | None], Iterable[Member]] | None = None,
    ) -> None:
        """`members`: the Discord layer's member cache, read for every prompt (a server id,
        or None for a DM, to the members it knows); with the speakers memory holds, these are
        the names no line of untrusted text may start as (`bot.speakers`)."""
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
        #: `idle` while no reply waits for its channel or is being written, else `busy`: work
        #: that must never delay a reply (the rolling summary) runs only while idle
        self.idle, self.busy = asyncio.Event(), asyncio.Event()
        self.idle.set()
        #: called with (channel id, guild id, prompt, the channel's settings) for every prompt
        #: built; `bot.summaries` watches where windows start through it
        self.prompt_hooks: list[Callable[[int, int | None, FittedPrompt, Settings], None]] = []
        self.recent: deque[ReplyStats] = deque(maxlen=50)  # for /admin model status
        self.members = members
        #: member id -> names, per server (or DM channel): read from memory once, then kept
        self._speakers: dict[tuple[str, int], dict[int, list[str]]] = {}

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
        if self.settings.vision and not fmt.carries_images:
            raise EngineError(
                f"VISION=true sends images as parts of chat messages, which the {fmt.name} "
                "prompt format cannot carry: use ENGINE=openai with PROMPT_FORMAT=server, or "
                "set VISION=false"
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
        aliases: Sequence[str | None] = (),
        hidden: bool = False,
    ) -> int:
        """Store a member's turn; `awaiting`: the bot owes it a reply (see TurnStore.add).
        `aliases`: the author's other names (global name, username), known from now on;
        `hidden`: kept but never shown to the model (an out-of-character line)."""
        if author_id is not None:
            await self._note_speaker(guild_id, channel_id, author_id, [name, *aliases])
        return await self.memory.turns.add(
            channel_id,
            "user",
            content,
            name=name,
            author_id=author_id,
            guild_id=guild_id,
            message_id=message_id,
            tokens=self.counter(content.strip()),
            awaiting=awaiting,
            hidden=hidden,
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
        replacing: int | None = None,
        stopped: bool = False,
    ) -> int:
        """Store the bot's turn; `answers`: the user turn it answers, no longer owed a reply;
        `replacing`: the reply it replaces, deleted in the same transaction; `stopped`: a
        member stopped it half-way."""
        ids = message_ids or []
        return await self.memory.turns.add(
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
            replacing=replacing,
            stopped=stopped,
        )

    async def replace_reply(
        self,
        old: StoredTurn,
        content: str,
        *,
        message_ids: list[int],
        persona: str | None,
        name: str,
        answers: int | None = None,
        stopped: bool = False,
    ) -> int:
        """A regenerated reply takes the place of `old` (one transaction: no moment without
        either); returns the new turn's id."""
        return await self.record_assistant(
            old.channel_id,
            content,
            guild_id=old.guild_id,
            message_ids=message_ids,
            persona=persona,
            name=name,
            answers=answers,
            replacing=old.id,
            stopped=stopped,
        )

    async def extend_reply(self, last: StoredTurn, addition: str, message_ids: list[int]) -> str:
        """/continue: `addition` joins the end of reply `last`, whose new messages are linked to
        it; its swipe alternatives end (they no longer match what is shown), and a reply that
        was stopped half-way is no longer marked so. The new text."""
        joiner = "" if addition[:1] in ",.;:!?)" else " "
        extended = last.content + joiner + addition
        await self.memory.turns.update(last.id, extended, self.counter(extended))
        if last.stopped:
            await self.memory.turns.mark(last.id, stopped=False)
        await self.memory.turns.link_messages(last.id, message_ids)
        await self.memory.swipes.end(last.id)
        return extended

    async def edit(self, message_id: int, content: str) -> bool:
        return await self.memory.turns.edit_message(
            message_id, content, self.counter(content.strip())
        )

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
        self.idle.clear()
        self.busy.set()
        try:
            async with self._locks[channel_id]:
                yield
        finally:
            self.pending -= 1
            if not self.pending:
                self.busy.clear()
                self.idle.set()

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
        reserved = [self.bot_name, bot_name, policy.persona or "", *cast]
        known = await self.known_names(channel_id, guild_id, reserved)
        history = known.shown(seen_by(history, bot_name))
        current = known.shown([current])[0] if current is not None else None
        candidates = [*([current] if current is not None else []), *history]
        context = await prompt_context(
            self.memory, settings, self.counter, channel_id, guild_id, candidates
        )
        if continue_last:  # the reopened reply ends the prompt: no block may follow it
            context = NO_CONTEXT
        notes = await channel_notes(self.memory, channel_id, self.counter, settings.notes_tokens)
        prompt = self._fit(
            chosen,
            history,
            current,
            budget,
            (channel_id, bot_name),
            "\n\n".join(filter(None, [scene, notes])),
            known.names(),
            context,
        )
        if recall_budget and prompt.older and not continue_last:
            prompt = await self._recall(
                channel_id, guild_id, prompt, recall_budget, bot_name, known
            )
        for hook in self.prompt_hooks:
            hook(channel_id, guild_id, prompt, settings)
        if continue_last and not reopen_last_reply(prompt, self.fmt):
            return None
        names = self._other_names(prompt, cast, known, bot_name)
        params = replace(
            params_from_settings(settings),
            stop=tuple(self.fmt.stops(names)),
            stop_ids=self.fmt.end_ids,
            **(overrides or {}),
        )
        images = (
            await self.memory.images.for_turns(t.id for t in prompt.turns if t.id is not None)
            if self.settings.vision
            else {}
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
            images=images,
        )

    async def _history(
        self, channel_id: int, budget: int, reply_to: int | None, skip: int | None = None
    ) -> tuple[list[Turn], Turn | None] | None:
        """The turns before the one being answered, and that turn; None if it was deleted.

        Human messages that arrived after `reply_to` wait for their own reply; the bot's replies
        to earlier messages belong before it even when stored later.
        """
        turns = await self.memory.turns.recent(channel_id, token_budget=budget)
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
        known: Sequence[str] = (),
        context: Context = NO_CONTEXT,
    ) -> FittedPrompt:
        """The prompt text fitted to `budget`, starting where the last one did when it can
        (remembered per channel and speaker: `slot`); `known` are the names no line of
        untrusted text may start as (`KnownNames.names`); `scene` ends the system text (a
        scene's roster, the channel's notes); `context` the blocks after the history."""
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
                known=known,
                context=context,
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
                speakers=[self.bot_name, *known],
                context=context,
            )
        self._start_hint[slot] = prompt.start_id
        return prompt

    # ---- who may speak ----------------------------------------------------------------------

    @staticmethod
    def _place(guild_id: int | None, channel_id: int) -> tuple[str, int]:
        return ("guild", guild_id) if guild_id is not None else ("channel", channel_id)

    async def _stored_speakers(self, guild_id: int | None, channel_id: int) -> dict[int, list[str]]:
        """Members who spoke in this place and their names, read from memory the first time."""
        place = self._place(guild_id, channel_id)
        if (known := self._speakers.get(place)) is None:
            known = {}
            for author, name in reversed(await self.memory.turns.speakers(guild_id, channel_id)):
                known.setdefault(author, []).append(name)
            self._speakers[place] = known
        return known

    async def _note_speaker(
        self, guild_id: int | None, channel_id: int, author: int, names: Sequence[str | None]
    ) -> None:
        known = await self._stored_speakers(guild_id, channel_id)
        held = known.setdefault(author, [])
        held += [n for n in names if n and n not in held]

    async def known_names(
        self, channel_id: int, guild_id: int | None, reserved: Sequence[str]
    ) -> KnownNames:
        """Every name known where `channel_id` is: `reserved` (the bot's side: its own name
        first, then the speaking persona's, the channel's, the scene's cast), then each
        member's names from memory and the member cache (`bot.speakers`)."""
        members = {
            m: list(n) for m, n in (await self._stored_speakers(guild_id, channel_id)).items()
        }
        if self.members is not None:
            for member in self.members(guild_id):
                held = members.setdefault(member.id, [])
                held += [n for n in member.names if n and n not in held]
        return KnownNames(reserved, members)

    @staticmethod
    def _other_names(
        prompt: FittedPrompt, cast: Sequence[str], known: KnownNames, bot_name: str
    ) -> list[str]:
        """Everyone but the speaking bot, as the prompt names them: the members in the prompt
        and the cast first (the stop strings take the first few), then everyone else known."""
        window = [*(t.name for t in prompt.turns if t.role == "user"), *cast]
        near = sorted(other_speakers(window, bot_name))
        return other_speakers([*near, *sorted(known.names())], bot_name)

    def recall_budget(self, settings: Settings) -> int:
        """Tokens of the window set aside for recalled turns (`settings` as this channel has
        them): 0 when recall is off here or the SQLite build has no full-text index."""
        if not (settings.recall and self.memory.fts):
            return 0
        return recall_tokens(settings)

    def _recall_head_cost(self) -> int:
        """Tokens a recall block costs besides its lines, in this model's format."""
        if self.fmt.templated:
            return self.counter(self.fmt.system_block(RECALL_HEADING)) + 1
        return self.counter(RECALL_BLOCK_HEAD)

    async def _recall(
        self,
        channel_id: int,
        guild_id: int | None,
        prompt: FittedPrompt,
        budget: int,
        bot_name: str,
        known: KnownNames,
    ) -> FittedPrompt:
        """Add the turns from before the window that best match the latest messages."""
        users = [t for t in prompt.turns if t.role == "user"]
        query = [t.content for t in reversed(prompt.turns[-3:])]
        if users and users[-1].content not in query:
            query.insert(0, users[-1].content)
        oldest = prompt.start_id if prompt.start_id is not None else prompt.turns[-1].id
        now = prompt.turns[-1].when if prompt.turns else None

        def shown_cost(turn: StoredTurn) -> int:
            (line,) = known.shown([turn.to_turn()])
            return self.counter(recall_line(line, bot_name, now)) + 1  # and its line break

        found = await recall(
            self.memory,
            channel_id,
            query,
            before_id=oldest,
            budget_tokens=budget - self._recall_head_cost() - BLOCK_MARGIN,
            window=[t.content for t in prompt.turns[:-1]],
            exclude_authors=await self.memory.places.blocked_users(guild_id),
            shown_cost=shown_cost,
        )
        recalled = known.shown([t.to_turn() for t in found])
        return with_recall(prompt, recalled, self.counter, bot_name)

    # ---- generating -------------------------------------------------------------------------

    async def stream(self, job: ReplyJob) -> AsyncIterator[str]:
        """Yield the cleaned reply as it grows; `job.text` holds the final text afterwards.

        An empty result gets one retry with a fresh seed, then a short notice, never an empty
        message. A reply stopped (`ReplyJob.stop`) ends with what it has, never retried.
        """
        for attempt in range(2):
            if job.stopped:
                break
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
            extra = (
                {"messages": self.fmt.messages(job.prompt, job.images)}
                if self.fmt.name == "server"
                else {}
            )
            gen: EngineRequest = self.engine.generate(
                job.prompt.text, params, cache_key=job.cache_key or str(job.channel_id), **extra
            )
            job.stats = gen.stats
            job.request = gen
            if job.stopped:  # stopped before this attempt started
                gen.cancel()
            shown = ""
            async for _ in gen:
                text = self.fmt.clean(gen.text, job.other_names, job.bot_name)
                if text and text != shown:
                    shown = text
                    yield text
            self.recent.append(gen.stats)
            job.request = None
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
