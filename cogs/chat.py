"""Talking to the bot: when it answers, what it stores, and how the reply reaches the channel.

Also the user commands `/reset`, `/regenerate` and `/continue`. Whether to answer comes from the
channel policy (`bot.policy`, through `bot.checks`); who speaks from `bot.webhooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.catchup import Claims, history_floor, owed_replies
from bot.checks import is_manager, place_of, policy_for, serves_here, speaks_here
from bot.conversation import EMPTY_NOTICE, Busy, ReplyJob
from bot.memory import StoredTurn
from bot.replies import ReplyStream, describe_failure, humanize, post, typing_while

if TYPE_CHECKING:
    from bot.app import HermesBot

log = logging.getLogger(__name__)

BUSY = "I'm busy with other messages right now. Try again in a moment."
APOLOGY = "Sorry, something went wrong while I was thinking. Please try again."
TIMEOUT = "Sorry, that took too long and I gave up. Please try again."


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
        turn = await self.memory.turn_for_message(ref.message_id)
        return turn is not None and turn.role == "assistant"

    def _ours(self, message: discord.Message) -> bool:
        """Posted by the bot itself or through one of its webhooks."""
        me = self.bot.user
        if me is not None and message.author.id == me.id:
            return True
        return message.webhook_id is not None and message.webhook_id in self.bot.webhooks.ids

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
    ) -> int | None:
        """Store a member's message where the bot serves; returns its turn id when the bot
        should answer it (the turn is stored as owed a reply).

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

    async def _ingest(self, message: discord.Message, *, live: bool, replied: bool) -> int | None:
        guild_id = message.guild.id if message.guild else None
        policy = await policy_for(self.bot, message.channel, guild_id, message.author)
        if policy.mode == "off" or policy.refusal is not None:
            return None
        if await self.memory.turn_for_message(message.id) is not None:
            return None  # a dispatch seen twice (e.g. replayed after a reconnect)
        text = humanize(message, self.bot.user)
        if message.attachments:
            names = ", ".join(a.filename for a in message.attachments)
            text = f"{text}\n[attached: {names}]".strip()
        if not text:
            return None
        owed = not replied and (policy.mode == "always" or await self.addressed(message))
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
        )
        if message.id in self.early:  # edited or deleted while we were storing it
            if (late := self.early.pop(message.id)) is None:
                await self.memory.delete_turn(turn_id)
                self.answering.discard(message.id)
                return None
            await self.conv.edit(message.id, late)
        return turn_id if owed else None

    # ---- events -----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        turn_id = await self.ingest(message)
        if turn_id is None:
            return
        task = asyncio.current_task()
        if task is not None:
            self.bot.track(task)
        await self.answer(message, turn_id)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.message.author.bot:
            return
        text = humanize(payload.message, self.bot.user)
        if not await self.conv.edit(payload.message_id, text):
            self._remember_early(payload.message_id, text)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if not await self.memory.delete_message(payload.message_id):
            self._remember_early(payload.message_id, None)

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        for message_id in payload.message_ids:
            if not await self.memory.delete_message(message_id):
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
        oldest first, through the normal queue (see `bot.catchup`). One run at a time; a
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
                except discord.HTTPException as exc:
                    log.warning("catch-up stopped: Discord answered %s %s", exc.status, exc.text)
                again = self._catch_up_again

    async def _catch_up_once(self) -> None:
        settings = self.bot.settings
        minutes = settings.catchup_minutes
        if minutes <= 0:
            return
        now = time.time()
        read = 0
        for channel_id, guild_id in await self.memory.known_channels():
            channel = await self._channel(channel_id)
            if channel is None:
                continue
            if (await policy_for(self.bot, channel, guild_id)).mode == "off":
                continue
            read += await self._read_back(channel, guild_id, now, minutes)
        owed = owed_replies(await self.memory.awaiting_turns(), now, minutes)
        for turn in owed.expired:
            await self.memory.mark_answered(turn.id)
        started = 0
        for turn in owed.answer:
            if turn.message_id is None or turn.message_id in self.answering:
                continue
            channel = await self._channel(turn.channel_id)
            if channel is None:
                continue
            if (await policy_for(self.bot, channel, turn.guild_id)).mode == "off":
                await self.memory.mark_answered(turn.id)
                continue
            self.answering.add(turn.message_id)
            trigger = channel.get_partial_message(turn.message_id)  # type: ignore[union-attr]
            # Started in order: each takes its place in the channel's queue before the next.
            self.bot.track(asyncio.create_task(self.answer(trigger, turn.id)))
            started += 1
        if read or started or owed.expired:
            log.info(
                "catch-up: %d recent messages read back, %d owed replies queued, "
                "%d too old to answer",
                read,
                started,
                len(owed.expired),
            )

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
        floor = history_floor(await self.memory.newest_message_id(channel.id), now, minutes)  # type: ignore[attr-defined]
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
        task = asyncio.current_task()
        waiting = self.bot.waiting_replies
        if task is not None:
            waiting.add(task)
        try:
            async with self.conv.slot(channel.id):
                waiting.discard(task)  # type: ignore[arg-type]
                await self.reply(channel, guild_id, turn_id, reference=message)
        except Busy:
            await self.memory.mark_answered(turn_id)
            await post(channel, BUSY, reference=message)
        finally:
            waiting.discard(task)  # type: ignore[arg-type]
            self.answering.discard(message.id)

    async def reply(
        self,
        channel: discord.abc.Messageable,
        guild_id: int | None,
        turn_id: int | None,
        *,
        reference: discord.Message | discord.PartialMessage | None = None,
        overrides: dict | None = None,
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
            job = await self.conv.prepare(
                channel.id,
                guild_id,
                reply_to=turn_id,
                overrides=overrides,
                parent_id=place_of(channel, guild_id).parent_id,
            )
            if job is None:
                return []  # the message was deleted while it waited
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
                        await self.memory.mark_answered(turn_id)  # type: ignore[arg-type]
            text = job.text
            if job.notes:
                text = f"{text}\n-# {' '.join(job.notes)}"
            messages = await stream.finish(text)
            if job.text != EMPTY_NOTICE:
                await self.conv.record_assistant(
                    channel.id,
                    job.text,
                    guild_id=guild_id,
                    persona=job.persona,
                    message_ids=[m.id for m in messages],
                    name=job.bot_name,
                    answers=turn_id,
                )
            elif turn_id is not None:
                await self.memory.mark_answered(turn_id)
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
            await self.memory.mark_answered(turn_id)

    # ---- user commands ----------------------------------------------------------------------

    @app_commands.command(name="reset", description="Forget this conversation")
    @serves_here
    async def reset(self, interaction: discord.Interaction) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        memory = self.memory
        if interaction.guild_id is not None:
            guild = await memory.guild(interaction.guild_id)
            if not (guild.reset_allowed or is_manager(interaction)):
                await interaction.response.send_message(
                    "An admin has not allowed /reset in this server.", ephemeral=True
                )
                return
        old = (await memory.channel(channel_id)).forget_before
        new = await memory.forget(channel_id, interaction.guild_id)
        if interaction.guild_id is not None:
            await memory.audit(
                interaction.user.id,
                "reset",
                guild_id=interaction.guild_id,
                channel_id=channel_id,
                old=old,
                new=new,
            )
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
        if await memory.last_assistant_turn(channel.id) is None:
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
            last = await memory.last_assistant_turn(channel.id)
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
            ids = await memory.message_ids(last.id)
            await memory.delete_turn(last.id)  # the new reply must not see the old one
            before = [
                t
                for t in await memory.recent_turns(channel.id, limit=50)
                if t.id < last.id and t.role == "user"
            ]
            messages = await self.reply(
                channel, interaction.guild_id, before[0].id if before else None
            )
            if messages:
                await self.bot.webhooks.delete_messages(channel, ids)
            else:  # no new reply: the old one stays, in Discord and in memory
                await memory.add_turn(
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
            job = await self.conv.prepare(
                channel.id,
                interaction.guild_id,
                continue_last=True,
                parent_id=place_of(channel, interaction.guild_id).parent_id,
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
            identity = await self.bot.webhooks.identity(channel, job.persona, interaction.guild_id)
            messages = await post(channel, text, identity=identity)
            extended = last.content + joiner + text
            await memory.update_turn(last.id, extended, self.conv.counter(extended))
            await memory.link_messages(last.id, [m.id for m in messages])
        await interaction.followup.send("Continued.", ephemeral=True)


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Chat(bot))
