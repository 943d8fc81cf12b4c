"""The reply runner: every reply the bot generates reaches Discord and memory through `Replier.run`.

A plain reply, a scene member's reply, /continue, /regenerate and a swipe differ only in what
they ask for (a `Reply`): the turn answered, who speaks, a fresh seed, the last reply reopened;
where the text goes (new messages, or the swiped message in place); and how it is stored (a new
turn, the last one extended, a regenerated one replacing the old, or one more alternative).
`run` is the one function that generates, sends and stores, so the rules live once: streaming
and splitting (`bot.discord.posting`), persona identities (`bot.discord.webhooks`), the reply
timeout, storing what the member saw when a reply stops half-way, the ⏹ button on a reply
being written (`bot.discord.stopping`), swipe buttons.

An owed reply (a member's message the bot decided to answer, stored `awaiting`) is an
`OwedReply` handle that settles exactly once. A process killed after a reply's first message
went out but before it was stored leaves the post recorded (`OwedReplies.posting`), and
catch-up adopts that reply instead of posting a second one (`bot.discord.catchup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp
import discord

from bot.conversation import EMPTY_NOTICE, Busy
from bot.discord.checks import place_of, scene_at
from bot.discord.owing import Outcome, OwedReply
from bot.discord.posting import (
    Alternative,
    Identity,
    ReplyStream,
    Target,
    describe_failure,
    post,
    typing_while,
)
from bot.discord.stopping import Stops, stop_view
from bot.discord.swipes import swipe_view
from bot.personas import persona_key
from bot.reply_job import ReplyJob
from bot.scenes import Scene, SceneMember, chained, member_context
from bot.store.turns import StoredTurn

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)

BUSY = "I'm busy with other messages right now. Try again in a moment."
APOLOGY = "Sorry, something went wrong while I was thinking. Please try again."
TIMEOUT = "Sorry, that took too long and I gave up. Please try again."

#: Anything that can show a message in a Discord channel (a text channel, thread or DM).
Channel = discord.abc.Messageable
Trigger = discord.Message | discord.PartialMessage


class Keep(enum.Enum):
    """How a run stores what it made."""

    NEW = "new"  # a new turn (a reply, a scene member's reply)
    REPLACE = "replace"  # a new turn in place of `Reply.old` (/regenerate)
    EXTEND = "extend"  # `Reply.old` made longer (/continue)
    ALTERNATIVE = "alternative"  # one more swipe alternative of `Reply.old`


@dataclass(slots=True)
class Reply:
    """What one run of the runner is asked to make."""

    channel: Channel
    guild_id: int | None
    #: the turn answered: the prompt ends with it (None: with the latest turn)
    reply_to: int | None = None
    #: who speaks (None: the channel's persona)
    persona: str | None = None
    #: the owed reply this run answers; `settles`: whether the run settles it (a scene
    #: member's run only records its post: the scene settles the message after its round)
    owed: OwedReply | None = None
    settles: bool = True
    #: the member's message the new messages reply to (where the bot posts as itself)
    reference: Trigger | None = None
    #: the human turn that led to the reply (its author may swipe; it stops being owed)
    asked: int | None = None
    keep: Keep = Keep.NEW
    #: the reply regenerated, continued or swiped (left out of the prompt, except continue)
    old: StoredTurn | None = None
    overrides: dict[str, Any] | None = None
    #: show it growing; otherwise post it complete (continue, swipes)
    stream: bool = True
    #: keep the typing indicator on while generating
    typing: bool = True
    #: a scene member's run shows its reply (growing from what it has so far) once `after` is
    #: set (the member before it is done), and sets `done` when it is done itself
    after: asyncio.Event | None = None
    done: asyncio.Event | None = None
    #: where the text goes instead of new messages (a swipe edits the swiped message)
    target: Target | None = None


@dataclass(slots=True)
class Result:
    """What a run made: the messages now showing it, and how it ended."""

    messages: list[discord.Message] = field(default_factory=list)
    text: str = ""
    turn_id: int | None = None
    #: None when it worked; else the notice the member gets (APOLOGY or TIMEOUT), or "" when
    #: there was nothing to answer (the message was deleted, the reply no longer the latest)
    failure: str | None = None
    #: the model had nothing (more) to say: a continue or swipe shows nothing then
    empty: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None


class Replier:
    """The reply runner and the ways into it; owned by the bot (`HermesBot.replies`)."""

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        #: Trigger message ids with a reply queued or in progress in this process.
        self.answering: set[int] = set()
        #: The replies being written that a ⏹ press may stop.
        self.stops = Stops()

    # ---- the runner -------------------------------------------------------------------------

    async def run(self, reply: Reply) -> Result:
        """Generate → stream/post → store one reply; the caller holds the channel's slot.

        Whatever the member ends up seeing is stored, once: the whole reply, or the part shown
        before a failure. An EMPTY_NOTICE is shown but not stored. Never raises for a failing
        model or Discord (the result says so); a cancel stores what was shown and goes on.
        """
        bot = self.bot
        settings = bot.settings
        channel = reply.channel
        result = Result()
        shown = asyncio.Event()
        typing = asyncio.create_task(typing_while(channel, shown)) if reply.typing else None
        job: ReplyJob | None = None
        target: Target | None = None
        stop_key: int | None = None
        try:
            job = await self._prepare(reply)
            if job is None:
                result.failure = ""
                return result
            target = reply.target or await self._stream(reply, job)
            if reply.stream and isinstance(target, ReplyStream):  # ⏹ while it is written
                stop_key = self.stops.open(job, await self._requester(reply))
                target.live_view = stop_view(stop_key)
            if reply.owed is not None and reply.target is None:
                await reply.owed.posting(job.persona)
            async with asyncio.timeout(settings.reply_timeout):
                if reply.stream:
                    # one piece behind: the last piece comes with `finish`, in the final edit
                    # that carries the buttons too, never in an edit of its own before it
                    held: str | None = None
                    async for partial in bot.conv.stream(job):
                        if held and (reply.after is None or reply.after.is_set()):  # its turn
                            shown.set()
                            await target.update(held)
                            await self._posted(reply, target)
                        held = partial
                else:
                    await bot.conv.complete(job)
            shown.set()
            result.text = job.text
            if job.text == EMPTY_NOTICE and reply.keep in (Keep.EXTEND, Keep.ALTERNATIVE):
                result.empty = True  # nothing to add, nothing new: what is shown stays
                return result
            if reply.after is not None:
                await reply.after.wait()
            text = job.text
            if reply.keep is Keep.ALTERNATIVE and isinstance(target, Alternative):
                # stored before it is shown: a member swipes from what memory holds
                text = target.fit(text)
                result.turn_id = await self._store(reply, job, [], text)
                result.messages = await target.finish(text)
                return result
            if job.notes and reply.keep in (Keep.NEW, Keep.REPLACE):
                text = f"{text}\n-# {' '.join(job.notes)}"
            stream = target if isinstance(target, ReplyStream) else None
            if stream and reply.keep in (Keep.NEW, Keep.REPLACE) and not job.notes:
                # swipe buttons go with the final text, if it is one message and stored
                stream.final_view = swipe_view() if job.text != EMPTY_NOTICE else None
            result.messages = await target.finish(text)
            await self._posted(reply, target)
            if job.text != EMPTY_NOTICE:
                offered = stream is not None and stream.view_shown
                result.turn_id = await self._store(
                    reply, job, result.messages, job.text, swipes=offered
                )
            elif reply.keep is Keep.REPLACE and reply.old is not None:
                await self.bot.memory.turns.delete(reply.old.id)  # its messages go, and it too
            elif reply.owed is not None and reply.settles:
                await reply.owed.settle(Outcome.ANSWERED)
            return result
        except TimeoutError:
            log.error(
                "reply timed out in channel %s after %.0fs", channel.id, settings.reply_timeout
            )
            result.failure = TIMEOUT
            await self._keep_shown(reply, job, target)
        except asyncio.CancelledError:
            await self._keep_shown(reply, job, target)
            raise
        except Exception as exc:
            if isinstance(exc, discord.HTTPException | aiohttp.ClientError):
                log.error(
                    "reply failed in channel %s: Discord %s", channel.id, describe_failure(exc)
                )
            else:
                log.exception(
                    "reply failed in channel %s (guild %s, turn %s, prompt %s tokens)",
                    channel.id,
                    reply.guild_id,
                    reply.reply_to,
                    job.prompt.tokens if job else "?",
                )
            result.failure = APOLOGY
            await self._keep_shown(reply, job, target)
        finally:
            if stop_key is not None:
                self.stops.close(stop_key)
            shown.set()
            if reply.done is not None:
                reply.done.set()
            if typing is not None:
                typing.cancel()
        return result

    async def _prepare(self, reply: Reply) -> ReplyJob | None:
        """The request, built from what memory holds now (None: nothing left to answer)."""
        channel = reply.channel
        persona = reply.persona
        cast: list[str] = []
        roster = ""
        if persona is not None:  # a scene member sees the rest of the cast and the roster
            scene = await scene_at(self.bot, channel, reply.guild_id)
            cast, roster = member_context(scene, persona)
        job = await self.bot.conv.prepare(
            channel.id,
            reply.guild_id,
            reply_to=reply.reply_to,
            persona=persona,
            overrides=reply.overrides,
            continue_last=reply.keep is Keep.EXTEND,
            parent_id=place_of(channel, reply.guild_id).parent_id,
            cast=cast,
            scene=roster,
            skip=reply.old.id if reply.old is not None and reply.keep is not Keep.EXTEND else None,
        )
        if job is not None and persona is not None:
            job.persona = persona  # a scene member keeps its name, the default one too
        return job

    async def _stream(self, reply: Reply, job: ReplyJob) -> ReplyStream:
        """New messages in the channel, as the speaking persona."""
        channel = reply.channel
        webhooks = self.bot.webhooks
        speaker = job.persona if reply.old is None else (reply.old.persona or job.persona)
        identity: Identity = await webhooks.identity(channel, speaker, reply.guild_id)
        stream = ReplyStream(
            channel,
            reply.reference,
            identity,
            interval=self.bot.settings.stream_interval,
            deadline=time.monotonic() + self.bot.settings.reply_timeout,
        )
        if identity.webhook is not None:
            stream.recover = lambda: webhooks.fresh_identity(channel, speaker, reply.guild_id)
        return stream

    async def _requester(self, reply: Reply) -> int | None:
        """The member the reply answers (who asked), who may stop or swipe it."""
        asked = await self.bot.memory.turns.get(reply.asked) if reply.asked is not None else None
        return asked.author_id if asked is not None else None

    async def _posted(self, reply: Reply, target: Target) -> None:
        if reply.owed is not None and target.messages and reply.target is None:
            await reply.owed.posted(target.messages[0].id)

    async def _store(
        self,
        reply: Reply,
        job: ReplyJob,
        messages: list[discord.Message],
        text: str,
        *,
        swipes: bool = False,
    ) -> int | None:
        """Store what the run showed, as its `Keep` says; with `swipes` (its buttons went out
        with it) keep its first alternative. The turn's id (None for an alternative)."""
        conv = self.bot.conv
        ids = [m.id for m in messages]
        old = reply.old
        if reply.keep is Keep.EXTEND and old is not None:
            await conv.extend_reply(old, text, ids)
            return old.id
        if reply.keep is Keep.ALTERNATIVE and old is not None:
            await self.bot.memory.swipes.add(old.id, text, conv.counter(text.strip()))
            return old.id
        answers = reply.owed.turn_id if reply.owed is not None else reply.asked
        if reply.keep is Keep.REPLACE and old is not None:
            turn = await conv.replace_reply(
                old,
                text,
                message_ids=ids,
                persona=job.persona,
                name=job.bot_name,
                answers=answers,
                stopped=job.stopped,
            )
        else:
            turn = await conv.record_assistant(
                reply.channel.id,
                text,
                guild_id=reply.guild_id,
                persona=job.persona,
                message_ids=ids,
                name=job.bot_name,
                answers=answers,
                stopped=job.stopped,
            )
        if reply.owed is not None and answers == reply.owed.turn_id:
            reply.owed.stored()
        if swipes:
            await self.bot.swipes.start(turn, text, job.reply_to, reply.asked)
        return turn

    async def _keep_shown(self, reply: Reply, job: ReplyJob | None, target: Target | None) -> None:
        """Store the part of a new reply the member already sees, when it stopped half-way."""
        if isinstance(target, ReplyStream):
            await target.clear_live()  # nobody can stop it any more
        if job is None or target is None or reply.target is not None:
            return
        if not target.messages or not target.text.strip():
            return
        kept = replace(reply, keep=Keep.NEW) if reply.keep is Keep.REPLACE else reply
        try:  # a new turn beside the old one when a regenerate stopped half-way; no swipes
            await self._store(kept, job, target.messages, target.text)
        except Exception:  # the store is closing (shutdown): nothing more to save
            log.warning("could not store the partial reply in channel %s", reply.channel.id)

    # ---- a member's message -----------------------------------------------------------------

    async def answer(self, trigger: Trigger, owed: OwedReply, where: Channel | None = None) -> None:
        """Reply to `trigger`, or in a channel with a scene let its cast answer (`answer_scene`
        picks who). Waits for the channel's turn first; while it waits, a shutdown cancels it
        at once and the reply stays owed, for catch-up to give after the restart. `where`: the
        thread opened for it (`bot.discord.threads`), where the reply goes, not as a reply."""
        channel = where or trigger.channel
        guild_id = trigger.guild.id if trigger.guild else None
        reference = trigger if where is None else None
        try:
            async with self.queued(channel.id, trigger.id):
                result = await self.run(
                    Reply(
                        channel,
                        guild_id,
                        reply_to=owed.turn_id,
                        owed=owed,
                        reference=reference,
                        asked=owed.turn_id,
                    )
                )
                if result.failure == "":
                    await owed.settle(Outcome.CANCELLED)
                elif result.failure is not None:
                    await self.notify(channel, result.failure, reference, owed)
        except Busy:
            await owed.settle(Outcome.GIVEN_UP)
            await post(channel, BUSY, reference=reference)

    async def answer_scene(
        self, trigger: Trigger, owed: OwedReply, scene: Scene, speakers: list[SceneMember]
    ) -> None:
        """The named (or picked) cast members answer `trigger`, each as itself, in order; then
        members their replies name answer them, at most SCENE_CHAIN times."""
        channel = trigger.channel
        guild_id = trigger.guild.id if trigger.guild else None
        chain = self.bot.settings.scene_chain
        try:
            async with self.queued(channel.id, trigger.id):
                posted = await self.scene_round(channel, guild_id, scene, speakers, owed, trigger)
                while chain > 0 and posted:
                    member, text = posted[0]
                    waiting = [m.name for m, _ in posted[1:]]
                    following = chained(scene, member.name, text, waiting)
                    posted = posted[1:]
                    if following:
                        chain -= 1
                        more = await self.scene_round(
                            channel, guild_id, scene, following[:1], owed, None
                        )
                        posted = more + posted
                await owed.settle(Outcome.ANSWERED)
        except Busy:
            await owed.settle(Outcome.GIVEN_UP)
            await post(channel, BUSY, reference=trigger)

    async def scene_round(
        self,
        channel: Channel,
        guild_id: int | None,
        scene: Scene,
        members: list[SceneMember],
        owed: OwedReply,
        reference: Trigger | None,
    ) -> list[tuple[SceneMember, str]]:
        """The members' replies, generated together (separate requests the engine batches) and
        streamed in order under each member's own name; the caller holds the channel's slot.
        The first round answers the member's message, a chained one the latest turn."""
        replies: list[tuple[SceneMember, Reply]] = []
        before: asyncio.Event | None = None
        for member in members:
            if scene.personas.get(persona_key(member.name)) is None:
                log.info("scene member %s has no persona any more; skipped", member.name)
                continue
            done = asyncio.Event()
            reply = Reply(
                channel,
                guild_id,
                reply_to=owed.turn_id if reference is not None else None,
                persona=member.name,
                owed=owed,
                settles=False,
                reference=reference,
                asked=owed.turn_id,
                typing=False,
                after=before,  # shown in order: each once the one before it is done
                done=done,
            )
            replies.append((member, reply))
            before = done
        shown = asyncio.Event()
        typing = asyncio.create_task(typing_while(channel, shown))
        try:
            results = await asyncio.gather(*(self.run(reply) for _, reply in replies))
        finally:
            shown.set()
            typing.cancel()
        if any(r.failure == "" for r in results):
            return []  # the message was deleted while it waited
        if any(r.failure == TIMEOUT for r in results):
            await post(channel, TIMEOUT, reference=reference)
        posted: list[tuple[SceneMember, str]] = []
        for (member, _), result in zip(replies, results, strict=True):
            if not result.ok:
                log.error("scene reply by %s failed in channel %s", member.name, channel.id)
            elif result.text != EMPTY_NOTICE:
                posted.append((member, result.text))
        return posted

    @contextlib.asynccontextmanager
    async def queued(self, channel_id: int, trigger_id: int) -> AsyncIterator[None]:
        """Wait for the channel's turn (`Conversations.slot`). While waiting, the reply is one
        a shutdown cancels at once (`HermesBot.waiting_replies`); the trigger is no longer
        being answered by this process once the block ends."""
        task = asyncio.current_task()
        waiting = self.bot.waiting_replies
        if task is not None:
            waiting.add(task)
        try:
            async with self.bot.conv.slot(channel_id):
                waiting.discard(task)  # type: ignore[arg-type]
                yield
        finally:
            waiting.discard(task)  # type: ignore[arg-type]
            self.answering.discard(trigger_id)

    async def notify(
        self, channel: Channel, text: str, reference: Trigger | None, owed: OwedReply | None
    ) -> None:
        """Tell the member the reply failed; the message is settled once that is posted (a
        notice that cannot be posted leaves it owed, for catch-up to try again)."""
        try:
            await post(channel, text, reference=reference)
        except (discord.HTTPException, aiohttp.ClientError) as exc:
            log.warning(
                "could not post the notice in channel %s: %s", channel.id, describe_failure(exc)
            )
            return
        if owed is not None:
            await owed.settle(Outcome.FAILED)

    # ---- the bot's last reply: /regenerate, /continue, swipes ---------------------------------

    async def regenerate(self, channel: Channel, guild_id: int | None, last: StoredTurn) -> bool:
        """Replace reply `last` with a new one (the caller holds the channel's slot); its old
        messages go once the new reply is stored. False: it failed, and the old one stays."""
        memory = self.bot.memory
        ids = await memory.turns.message_ids(last.id)
        before = [
            t
            for t in await memory.turns.recent(channel.id, limit=50)
            if t.id < last.id and t.role == "user"
        ]
        asked = before[0].id if before else None
        result = await self.run(
            Reply(
                channel,
                guild_id,
                reply_to=asked,
                persona=last.persona,
                asked=asked,
                keep=Keep.REPLACE,
                old=last,
            )
        )
        if result.ok and result.messages:
            await self.bot.webhooks.delete_messages(channel, ids)
            return True
        if result.failure:  # said in the channel too, where the new reply was expected
            await self.notify(channel, result.failure, None, None)
        return False

    async def extend(self, channel: Channel, guild_id: int | None, last: StoredTurn) -> Result:
        """/continue: the model writes on from reply `last`'s final word, posted as new messages
        by the same speaker; the caller holds the channel's slot."""
        return await self.run(
            Reply(
                channel,
                guild_id,
                persona=last.persona,
                keep=Keep.EXTEND,
                old=last,
                stream=False,
                typing=False,
            )
        )

    async def alternative(
        self,
        channel: Channel,
        guild_id: int | None,
        turn: StoredTurn,
        reply_to: int | None,
        target: Target,
        seed: int,
    ) -> Result:
        """A swipe: another version of reply `turn` (its prompt without it, seed `seed`), shown
        in `target` and stored as one more alternative."""
        async with self.bot.conv.slot(channel.id):
            return await self.run(
                Reply(
                    channel,
                    guild_id,
                    reply_to=reply_to,
                    persona=turn.persona,
                    keep=Keep.ALTERNATIVE,
                    old=turn,
                    overrides={"seed": seed},
                    stream=False,
                    typing=False,
                    target=target,
                )
            )
