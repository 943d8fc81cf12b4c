"""Talking to the bot: when it answers, what it stores, and how the reply reaches the channel.

Also the user commands `/reset`, `/regenerate` and `/continue`. Whether to answer comes from the
channel policy (`bot.policy`, through `bot.discord.checks`); who speaks from `bot.discord.webhooks`. In a channel
with a scene (`bot.scenes`) the cast members a message names (or the one the scene's policy picks)
answer, each as itself, and may answer each other up to SCENE_CHAIN times per human message;
naming a cast member (name or nickname, case- and confusable-folded) addresses it in any mode but
`off`. With WAKE_WORDS on, a `mention` channel also answers a message naming the bot or its
persona. Replies posted as one message get swipe buttons (`bot.discord.swipes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NamedTuple

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.conversation import EMPTY_NOTICE, Busy, ReplyJob
from bot.discord.attachments import message_text
from bot.discord.catchup import Claims, history_floor, owed_replies
from bot.discord.checks import audit, is_manager, place_of, policy_for, serves_here, speaks_here
from bot.discord.posting import ReplyStream, describe_failure, post, typing_while
from bot.personas import persona_key
from bot.policy import ChannelPolicy
from bot.scenes import Scene, SceneMember, chained, load_scene, member_context, speakers_for
from bot.scenes import mentions_any as _mentions_any
from bot.store.turns import StoredTurn

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)

BUSY = "I'm busy with other messages right now. Try again in a moment."
APOLOGY = "Sorry, something went wrong while I was thinking. Please try again."
TIMEOUT = "Sorry, that took too long and I gave up. Please try again."


class Taken(NamedTuple):
    """A member's message the bot will answer: its stored turn, and in a scene who speaks."""

    turn_id: int
    scene: Scene | None
    speakers: list[SceneMember]


class Chat(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.conv = bot.conv
        self.memory = bot.memory
        self.last_trigger: dict[int, float] = {}  # author id -> time of their last trigger
        self.early: dict[int, str | None] = {}  # message id -> edited text, or None if deleted
        #: Messages this process has taken in (a live event or catch-up, whichever came first).
        self.claims = Claims()
        #: Trigger message ids with a reply queued or in progress in this process.
        self.answering: set[int] = set()
        self._catching_up = asyncio.Lock()
        self._catch_up_again = False
        self.rng = random.Random()  # the `natural` scene policy's draws

    # ---- deciding ---------------------------------------------------------------------------

    async def addressed(self, message: discord.Message) -> bool:
        """Mentioned, or a reply to one of the bot's messages (its own or its webhooks')."""
        me = self.bot.user
        if me is not None and me in message.mentions:
            return True
        ref = message.reference
        if ref is None or ref.message_id is None:
            return False
        resolved = ref.resolved
        if isinstance(resolved, discord.Message):
            if me is not None and resolved.author.id == me.id:
                return True
            if resolved.webhook_id and resolved.webhook_id in self.bot.webhooks.ids:
                return True
        turn = await self.memory.turns.for_message(ref.message_id)
        return turn is not None and turn.role == "assistant"

    def _ours(self, message: discord.Message) -> bool:
        """Posted by the bot itself or through one of its webhooks."""
        me = self.bot.user
        if me is not None and message.author.id == me.id:
            return True
        return message.webhook_id is not None and message.webhook_id in self.bot.webhooks.ids

    async def replied_persona(self, message: discord.Message) -> str | None:
        """The persona whose reply `message` answers (a Discord reply to it), if any."""
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        turn = await self.memory.turns.for_message(ref.message_id)
        return turn.persona if turn is not None and turn.role == "assistant" else None

    def woken(self, policy: ChannelPolicy, text: str, scene: Scene) -> bool:
        """WAKE_WORDS: the message names the bot, its persona, a cast member or an extra word."""
        values = policy.settings.values
        if not values.get("wake_words"):
            return False
        me = self.bot.user
        words = [self.conv.bot_name, policy.persona or "", *scene.names()]
        words += [n for m in scene.active for n in m.nicknames]
        if me is not None:
            words += [me.name, getattr(me, "display_name", "")]
        words += str(values.get("wake_extra") or "").split(",")
        return _mentions_any(text, [w for w in words if w and w.strip()])

    def _cooling(self, message: discord.Message) -> bool:
        """Whether the author triggered a reply less than USER_COOLDOWN before (or after) this
        message; by the messages' own times, so catch-up judges a burst as it happened."""
        at = message.created_at.timestamp()
        last = self.last_trigger.get(message.author.id)
        if last is not None and abs(at - last) < self.bot.settings.user_cooldown:
            return True
        self.last_trigger[message.author.id] = at
        return False

    async def ingest(
        self, message: discord.Message, *, live: bool = True, replied: bool = False
    ) -> Taken | None:
        """Store a member's message where the bot serves; returns its turn (and the scene's
        speakers) when the bot should answer it: the turn is stored as owed a reply.

        The one path for live events and for messages found by catch-up (`live=False`: they
        are answered later, from memory, oldest first). A message seen twice (a replayed
        dispatch, or both paths) is taken once. `replied`: the bot's reply to it is already in
        the channel (it stopped before storing that), so it is stored but not owed.
        """
        if self._ours(message) or message.author.bot or message.webhook_id is not None:
            # Replies through our own webhooks are stored by the code that posts them.
            return None
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return None
        if not self.claims.claim(message.id):
            return None
        try:
            return await self._ingest(message, live=live, replied=replied)
        except BaseException:
            self.claims.release(message.id)
            self.answering.discard(message.id)
            raise

    async def _ingest(self, message: discord.Message, *, live: bool, replied: bool) -> Taken | None:
        guild_id = message.guild.id if message.guild else None
        policy = await policy_for(self.bot, message.channel, guild_id, message.author)
        if policy.mode == "off" or policy.refusal is not None:
            return None
        if await self.memory.turns.for_message(message.id) is not None:
            return None  # a dispatch seen twice (e.g. replayed after a reconnect)
        text = await message_text(message, self.bot.user, self.bot.settings.attachment_kb)
        if not text:
            return None
        owed = False
        scene: Scene | None = None
        speakers: list[SceneMember] = []
        if not replied:
            scene = await load_scene(self.memory, self.bot.personas, message.channel.id, guild_id)
            said = message.clean_content  # names count in what was written, not in attachments
            # naming cast members addresses them in any mode but off; WAKE_WORDS is for the rest
            named = bool(scene) and bool(scene.named(said))
            called = named or await self.addressed(message) or self.woken(policy, said, scene)
            owed = policy.mode == "always" or called
            if owed and scene and live:  # catch-up picks when it answers (`_answer_owed`)
                replied_to = await self.replied_persona(message)
                speakers = await self._pick(scene, said, replied_to, guild_id)
                owed = bool(speakers)
        if owed and self._cooling(message):
            owed = False
            with contextlib.suppress(discord.HTTPException):
                await message.add_reaction("⏳")
        if owed and live:
            self.answering.add(message.id)  # before it is stored: catch-up must not take it
        turn_id = await self.conv.record_user(
            message.channel.id,
            text,
            name=message.author.display_name,
            author_id=message.author.id,
            guild_id=guild_id,
            message_id=message.id,
            awaiting=owed,
            aliases=(message.author.global_name, message.author.name),
        )
        if message.id in self.early:  # edited or deleted while we were storing it
            if (late := self.early.pop(message.id)) is None:
                await self.memory.turns.delete(turn_id)
                self.answering.discard(message.id)
                return None
            await self.conv.edit(message.id, late)
        return Taken(turn_id, scene, speakers) if owed else None

    async def _pick(
        self, scene: Scene, said: str, replied_to: str | None, guild_id: int | None
    ) -> list[SceneMember]:
        """The cast members who answer `said` in this channel's scene (the round moves on)."""
        speakers = speakers_for(scene, said, replied_to=replied_to, pick=True, rng=self.rng)
        state = scene.state
        if state.policy in ("list", "manual"):  # the pick moved the round or used the choice
            await self.memory.scenes.update(
                state.channel_id,
                guild_id,
                next_seat=state.next_seat,
                manual_next=state.manual_next,
            )
        return speakers

    # ---- events -----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        taken = await self.ingest(message)
        if taken is None:
            return
        task = asyncio.current_task()
        if task is not None:
            self.bot.track(task)
        if taken.speakers and taken.scene is not None:
            await self.answer_scene(message, taken.turn_id, taken.scene, taken.speakers)
            return
        await self.answer(message, taken.turn_id)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.message.author.bot:
            return
        text = await message_text(payload.message, self.bot.user, self.bot.settings.attachment_kb)
        if not await self.conv.edit(payload.message_id, text):
            self._remember_early(payload.message_id, text)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if not await self.memory.turns.delete_message(payload.message_id):
            self._remember_early(payload.message_id, None)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            if not await self.memory.turns.delete_message(message_id):
                self._remember_early(message_id, None)

    def _remember_early(self, message_id: int, content: str | None) -> None:
        """An edit or delete that overtook the message's own event (each runs as its own task)."""
        self.early[message_id] = content
        while len(self.early) > 1000:
            self.early.pop(next(iter(self.early)))

    # ---- catching up ------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """A new gateway session (the first, or one after the old could not be resumed):
        nothing missed meanwhile will be replayed, so read it back (`catch_up`)."""
        self.bot.track(asyncio.create_task(self.catch_up(), name="catch-up"))

    async def catch_up(self) -> None:
        """Store what each served channel got while the bot was away and answer what is owed,
        oldest first, through the normal queue (see `bot.discord.catchup`). One run at a time; a
        session that starts during a run gets one more run after it."""
        if self._catching_up.locked():
            self._catch_up_again = True
            return
        async with self._catching_up:
            again = True
            while again:
                self._catch_up_again = False
                try:
                    await self._catch_up_once()
                except (discord.HTTPException, aiohttp.ClientError) as exc:
                    log.warning("catch-up stopped: %s", describe_failure(exc))
                again = self._catch_up_again

    async def _catch_up_once(self) -> None:
        settings = self.bot.settings
        minutes = settings.catchup_minutes
        if minutes <= 0:
            return
        now = time.time()
        read = 0
        for channel_id, guild_id in await self.memory.owed.known_channels():
            channel = await self._channel(channel_id)
            if channel is None:
                continue
            if (await policy_for(self.bot, channel, guild_id)).mode == "off":
                continue
            try:
                read += await self._read_back(channel, guild_id, now, minutes)
            except (discord.HTTPException, aiohttp.ClientError) as exc:
                # one channel's history out of reach must not keep the others from catching up
                log.warning("catch-up skipped channel %s: %s", channel_id, describe_failure(exc))
        owed = owed_replies(await self.memory.owed.awaiting(), now, minutes)
        for turn in owed.expired:
            await self.memory.owed.mark_answered(turn.id)
        started = 0
        for turn in owed.answer:
            if turn.message_id is None or turn.message_id in self.answering:
                continue
            channel = await self._channel(turn.channel_id)
            if channel is None:
                continue
            if (await policy_for(self.bot, channel, turn.guild_id)).mode == "off":
                await self.memory.owed.mark_answered(turn.id)
                continue
            self.answering.add(turn.message_id)
            trigger = channel.get_partial_message(turn.message_id)  # type: ignore[union-attr]
            # Started in order: each takes its place in the channel's queue before the next.
            self.bot.track(asyncio.create_task(self._answer_owed(trigger, turn)))
            started += 1
        if read or started or owed.expired:
            log.info(
                "catch-up: %d recent messages read back, %d owed replies queued, "
                "%d too old to answer",
                read,
                started,
                len(owed.expired),
            )

    async def _answer_owed(self, trigger: discord.PartialMessage, turn: StoredTurn) -> None:
        """Answer a stored turn still owed a reply, as it would have been answered live."""
        scene = await load_scene(self.memory, self.bot.personas, turn.channel_id, turn.guild_id)
        if scene:
            speakers = await self._pick(scene, turn.content, None, turn.guild_id)
            if not speakers:  # the scene gives nobody the word
                await self.memory.owed.mark_answered(turn.id)
                self.answering.discard(trigger.id)
                return
            await self.answer_scene(trigger, turn.id, scene, speakers)
            return
        await self.answer(trigger, turn.id)

    async def _channel(self, channel_id: int) -> discord.abc.Messageable | None:
        channel = self.bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await self.bot.fetch_channel(channel_id)
            except discord.HTTPException:
                return None  # gone, or no longer visible to the bot
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def _read_back(
        self, channel: discord.abc.Messageable, guild_id: int | None, now: float, minutes: float
    ) -> int:
        """Store the messages `channel` got since the newest one memory holds (within the
        window and the cap); returns how many were new."""
        floor = history_floor(await self.memory.owed.newest_message_id(channel.id), now, minutes)  # type: ignore[attr-defined]
        last = getattr(channel, "last_message_id", None)  # from the gateway, when it says
        if last is not None and last <= floor:
            return 0  # nothing new there: no request
        missed = [
            m
            async for m in channel.history(
                limit=self.bot.settings.catchup_messages,
                after=discord.Object(floor),
                oldest_first=False,
            )
        ]
        missed.reverse()
        # A message the bot already replied to (it stopped before storing that) is not owed.
        replied = {
            m.reference.message_id
            for m in missed
            if self._ours(m) and m.reference is not None and m.reference.message_id
        }
        members: dict[int, discord.Member | None] = {}
        for message in missed:
            if guild_id is not None and not isinstance(message.author, discord.Member):
                # History carries no member roles, and the access rule needs them.
                if message.author.id not in members:
                    members[message.author.id] = await self._member(message)
                member = members[message.author.id]
                if member is None:
                    continue  # no longer in the server
                message.author = member
            await self.ingest(message, live=False, replied=message.id in replied)
        return len(missed)

    async def _member(self, message: discord.Message) -> discord.Member | None:
        guild = message.guild
        if guild is None:
            return None
        try:
            return guild.get_member(message.author.id) or await guild.fetch_member(
                message.author.id
            )
        except discord.HTTPException:
            return None

    # ---- replying ---------------------------------------------------------------------------

    async def answer(self, message: discord.Message | discord.PartialMessage, turn_id: int) -> None:
        """Generate and post the reply to `message`, then store it as the bot's turn.

        Waits for the channel's turn first; while it waits, a shutdown cancels it at once and
        the stored turn stays owed, for catch-up to answer after the restart.
        """
        channel = message.channel
        guild_id = message.guild.id if message.guild else None
        try:
            async with self._queued(channel.id, message.id):
                await self.reply(channel, guild_id, turn_id, reference=message)
        except Busy:
            await self.memory.owed.mark_answered(turn_id)
            await post(channel, BUSY, reference=message)

    @contextlib.asynccontextmanager
    async def _queued(self, channel_id: int, trigger_id: int) -> AsyncIterator[None]:
        """Wait for the channel's turn (`Conversations.slot`). While waiting, the reply is one
        a shutdown cancels at once (`HermesBot.waiting_replies`); the trigger is no longer
        being answered by this process once the block ends."""
        task = asyncio.current_task()
        waiting = self.bot.waiting_replies
        if task is not None:
            waiting.add(task)
        try:
            async with self.conv.slot(channel_id):
                waiting.discard(task)  # type: ignore[arg-type]
                yield
        finally:
            waiting.discard(task)  # type: ignore[arg-type]
            self.answering.discard(trigger_id)

    async def reply(
        self,
        channel: discord.abc.Messageable,
        guild_id: int | None,
        turn_id: int | None,
        *,
        reference: discord.Message | discord.PartialMessage | None = None,
        overrides: dict | None = None,
        persona: str | None = None,
    ) -> list[discord.Message]:
        """Stream one reply into `channel` and store it; the caller holds the channel's slot.

        The turn answered (`turn_id`) stops being owed as soon as the reply's first message is
        up. Whatever the user ends up seeing is stored as the bot's turn, once: the whole reply,
        or the part shown before a failure (then followed by an apology).
        """
        settings = self.bot.settings
        shown = asyncio.Event()
        typing = asyncio.create_task(typing_while(channel, shown))
        job = None
        stream: ReplyStream | None = None
        try:
            cast, roster = await self._scene_context(channel.id, guild_id, persona)
            job = await self.conv.prepare(
                channel.id,
                guild_id,
                reply_to=turn_id,
                persona=persona,
                overrides=overrides,
                parent_id=place_of(channel, guild_id).parent_id,
                cast=cast,
                scene=roster,
            )
            if job is None:
                return []  # the message was deleted while it waited
            if persona is not None:  # a scene member keeps its name, the default one too
                job.persona = persona
            webhooks = self.bot.webhooks
            identity = await webhooks.identity(channel, job.persona, guild_id)
            deadline = time.monotonic() + settings.reply_timeout
            stream = ReplyStream(
                channel, reference, identity, interval=settings.stream_interval, deadline=deadline
            )
            if identity.webhook is not None:
                stream.recover = lambda: webhooks.fresh_identity(channel, job.persona, guild_id)
            owed = turn_id is not None
            async with asyncio.timeout(settings.reply_timeout):
                async for partial in self.conv.stream(job):
                    shown.set()
                    await stream.update(partial)
                    if owed and stream.messages:
                        owed = False
                        await self.memory.owed.mark_answered(turn_id)  # type: ignore[arg-type]
            text = job.text
            if job.notes:
                text = f"{text}\n-# {' '.join(job.notes)}"
            messages = await stream.finish(text)
            if job.text != EMPTY_NOTICE:
                await self._keep(channel.id, guild_id, job, messages, turn_id)
            elif turn_id is not None:
                await self.memory.owed.mark_answered(turn_id)
            return messages
        except TimeoutError:
            log.error(
                "reply timed out in channel %s after %.0fs", channel.id, settings.reply_timeout
            )
            await self._keep_shown(stream, job, channel.id, guild_id, turn_id)
            await self._notify(channel, TIMEOUT, reference, turn_id)
        except asyncio.CancelledError:
            await self._keep_shown(stream, job, channel.id, guild_id, turn_id)
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
                    guild_id,
                    turn_id,
                    job.prompt.tokens if job else "?",
                )
            await self._keep_shown(stream, job, channel.id, guild_id, turn_id)
            await self._notify(channel, APOLOGY, reference, turn_id)
        finally:
            shown.set()
            typing.cancel()
        return []

    async def _keep_shown(
        self,
        stream: ReplyStream | None,
        job: ReplyJob | None,
        channel_id: int,
        guild_id: int | None,
        turn_id: int | None,
    ) -> None:
        """Store the part of a reply the user already sees, when it stopped half-way."""
        if stream is None or job is None or not stream.messages or not stream.text.strip():
            return
        try:
            await self.conv.record_assistant(
                channel_id,
                stream.text,
                guild_id=guild_id,
                persona=job.persona,
                message_ids=[m.id for m in stream.messages],
                name=job.bot_name,
                answers=turn_id,
            )
        except Exception:  # the store is closing (shutdown): nothing more to save
            log.warning("could not store the partial reply in channel %s", channel_id)

    async def _notify(
        self,
        channel: discord.abc.Messageable,
        text: str,
        reference: discord.Message | discord.PartialMessage | None,
        turn_id: int | None,
    ) -> None:
        """Tell the member the reply failed; the message is answered once that is posted."""
        try:
            await post(channel, text, reference=reference)
        except (discord.HTTPException, aiohttp.ClientError) as exc:
            log.warning(
                "could not post the notice in channel %s: %s", channel.id, describe_failure(exc)
            )
            return
        if turn_id is not None:
            await self.memory.owed.mark_answered(turn_id)

    async def _keep(
        self,
        channel_id: int,
        guild_id: int | None,
        job: ReplyJob,
        messages: list[discord.Message],
        asked: int | None,
    ) -> int:
        """Store a posted reply as the speaking persona's turn; offer swipes on a one-message
        reply to the author of turn `asked` (the human message that led to it)."""
        turn = await self.conv.record_assistant(
            channel_id,
            job.text,
            guild_id=guild_id,
            persona=job.persona,
            message_ids=[m.id for m in messages],
            name=job.bot_name,
            answers=asked,
        )
        if len(messages) == 1 and not job.notes:
            await self.bot.swipes.attach(messages[0], turn, job.text, job.reply_to, asked)
        return turn

    async def _scene_context(
        self, channel_id: int, guild_id: int | None, persona: str | None
    ) -> tuple[list[str], str]:
        """The other cast members and the roster, when `persona` plays in this channel's scene."""
        if persona is None:
            return [], ""
        scene = await load_scene(self.memory, self.bot.personas, channel_id, guild_id)
        return member_context(scene, persona)

    # ---- scenes -----------------------------------------------------------------------------

    async def answer_scene(
        self,
        message: discord.Message | discord.PartialMessage,
        turn_id: int,
        scene: Scene,
        speakers: list[SceneMember],
    ) -> None:
        """The named (or picked) cast members answer `message`, each as itself, in order; then
        members their replies name answer them, at most SCENE_CHAIN times."""
        channel = message.channel
        guild_id = message.guild.id if message.guild else None
        chain = self.bot.settings.scene_chain
        try:
            async with self._queued(channel.id, message.id):
                posted = await self.scene_round(
                    channel, guild_id, scene, speakers, turn_id, message, turn_id
                )
                while chain > 0 and posted:
                    member, text = posted[0]
                    waiting = [m.name for m, _ in posted[1:]]
                    following = chained(scene, member.name, text, waiting)
                    posted = posted[1:]
                    if following:
                        chain -= 1
                        more = await self.scene_round(
                            channel, guild_id, scene, following[:1], None, None, turn_id
                        )
                        posted = more + posted
                await self.memory.owed.mark_answered(turn_id)
        except Busy:
            await self.memory.owed.mark_answered(turn_id)
            await post(channel, BUSY, reference=message)

    async def scene_round(
        self,
        channel: discord.abc.Messageable,
        guild_id: int | None,
        scene: Scene,
        members: list[SceneMember],
        turn_id: int | None,
        reference: discord.Message | discord.PartialMessage | None,
        asked: int | None,
    ) -> list[tuple[SceneMember, str]]:
        """Generate the members' replies together (separate requests the engine batches), then
        post them in order under each member's own name; the caller holds the channel's slot."""
        settings = self.bot.settings
        parent_id = place_of(channel, guild_id).parent_id
        jobs: list[tuple[SceneMember, ReplyJob]] = []
        for member in members:
            if scene.personas.get(persona_key(member.name)) is None:
                log.info("scene member %s has no persona any more; skipped", member.name)
                continue
            cast, roster = member_context(scene, member.name)
            job = await self.conv.prepare(
                channel.id,
                guild_id,
                reply_to=turn_id,
                persona=member.name,
                parent_id=parent_id,
                cast=cast,
                scene=roster,
            )
            if job is None:
                return []  # the message was deleted while it waited
            job.persona = member.name
            jobs.append((member, job))
        shown = asyncio.Event()
        typing = asyncio.create_task(typing_while(channel, shown))
        try:
            async with asyncio.timeout(settings.reply_timeout):
                results = await asyncio.gather(
                    *(self.conv.complete(job) for _, job in jobs), return_exceptions=True
                )
        except TimeoutError:
            log.error("scene reply timed out in channel %s", channel.id)
            await post(channel, TIMEOUT, reference=reference)
            return []
        finally:
            shown.set()
            typing.cancel()
        posted: list[tuple[SceneMember, str]] = []
        for (member, job), result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                log.error("scene reply by %s failed in channel %s", member.name, channel.id,
                          exc_info=result)  # fmt: skip
                continue
            try:
                messages = await self.bot.webhooks.post_as(
                    channel, member.name, job.text, guild_id, reference=reference
                )
            except discord.HTTPException:
                log.exception("could not post %s's reply in channel %s", member.name, channel.id)
                continue
            if job.text != EMPTY_NOTICE:
                await self._keep(channel.id, guild_id, job, messages, asked)
                posted.append((member, job.text))
        return posted

    # ---- user commands ----------------------------------------------------------------------

    @app_commands.command(name="reset", description="Forget this conversation")
    @serves_here
    async def reset(self, interaction: discord.Interaction) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        memory = self.memory
        if interaction.guild_id is not None:
            guild = await memory.places.guild(interaction.guild_id)
            if not (guild.reset_allowed or is_manager(interaction)):
                await interaction.response.send_message(
                    "An admin has not allowed /reset in this server.", ephemeral=True
                )
                return
        old = (await memory.places.channel(channel_id)).forget_before
        new = await memory.turns.forget(channel_id, interaction.guild_id)
        await audit(interaction, "reset", old, new, channel_id)
        await interaction.response.send_message(
            "Done: I forgot our conversation here.", ephemeral=True
        )

    @contextlib.asynccontextmanager
    async def _last_reply(
        self, interaction: discord.Interaction, verb: str
    ) -> AsyncIterator[StoredTurn | None]:
        """Hold the channel and yield the bot's last reply there, or None once answered.

        Defers (generation outlasts Discord's 3 s), waits for the channel's turn, and reads the
        reply again then: a /regenerate or /reset that ran while this one waited may have
        replaced or hidden it. (The `speaks_here` check has already let the member in.)
        """
        channel = interaction.channel
        assert channel is not None
        nothing = f"I have no reply here to {verb}."
        memory = self.memory
        if await memory.turns.last_assistant(channel.id) is None:
            await interaction.response.send_message(nothing, ephemeral=True)
            yield None
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.conv.slot(channel.id))
            except Busy:
                await interaction.followup.send(BUSY, ephemeral=True)
                yield None
                return
            last = await memory.turns.last_assistant(channel.id)
            if last is None:
                await interaction.followup.send(nothing, ephemeral=True)
            yield last

    @app_commands.command(name="regenerate", description="Replace my last reply here")
    @speaks_here
    async def regenerate(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        memory = self.memory
        async with self._last_reply(interaction, "regenerate") as last:
            if last is None or channel is None:
                return
            ids = await memory.turns.message_ids(last.id)
            await memory.turns.delete(last.id)  # the new reply must not see the old one
            before = [
                t
                for t in await memory.turns.recent(channel.id, limit=50)
                if t.id < last.id and t.role == "user"
            ]
            messages = await self.reply(
                channel,
                interaction.guild_id,
                before[0].id if before else None,
                persona=last.persona,
            )
            if messages:
                await self.bot.webhooks.delete_messages(channel, ids)
            else:  # no new reply: the old one stays, in Discord and in memory
                await memory.turns.add(
                    channel.id,
                    "assistant",
                    last.content,
                    name=last.name,
                    guild_id=last.guild_id,
                    message_id=ids[0] if ids else None,
                    extra_message_ids=ids[1:],
                    persona=last.persona,
                    tokens=last.tokens,
                    created_at=last.created_at,
                )
        await interaction.followup.send(
            "Regenerated." if messages else f"{APOLOGY} (My previous reply stays.)",
            ephemeral=True,
        )

    @app_commands.command(name="continue", description="Make my last reply longer")
    @speaks_here
    async def continue_(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        memory = self.memory
        async with self._last_reply(interaction, "continue") as last:
            if last is None or channel is None:
                return
            cast, roster = await self._scene_context(channel.id, interaction.guild_id, last.persona)
            job = await self.conv.prepare(
                channel.id,
                interaction.guild_id,
                continue_last=True,
                persona=last.persona,
                parent_id=place_of(channel, interaction.guild_id).parent_id,
                cast=cast,
                scene=roster,
            )
            if job is None:  # someone spoke after my reply: it is no longer mine to extend
                await interaction.followup.send(
                    "My last reply is no longer the latest message here, so I can't continue it.",
                    ephemeral=True,
                )
                return
            try:
                async with asyncio.timeout(self.bot.settings.reply_timeout):
                    text = await self.conv.complete(job)
            except Exception:  # a failing or stuck model: say so, change nothing
                log.exception("continue failed in channel %s", channel.id)
                await interaction.followup.send(APOLOGY, ephemeral=True)
                return
            if not text or text == EMPTY_NOTICE:
                await interaction.followup.send("I had nothing to add.", ephemeral=True)
                return
            joiner = "" if text[:1] in ",.;:!?)" else " "
            identity = await self.bot.webhooks.identity(
                channel, last.persona or job.persona, interaction.guild_id
            )
            messages = await post(channel, text, identity=identity)
            extended = last.content + joiner + text
            await memory.turns.update(last.id, extended, self.conv.counter(extended))
            await memory.turns.link_messages(last.id, [m.id for m in messages])
            await memory.swipes.end(last.id)  # its versions no longer match what is shown
        await interaction.followup.send("Continued.", ephemeral=True)


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Chat(bot))
