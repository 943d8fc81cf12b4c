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

import discord
from discord import app_commands
from discord.ext import commands

from bot.attachments import message_text
from bot.checks import is_manager, place_of, policy_for, serves_here, speaks_here
from bot.conversation import EMPTY_NOTICE, Busy
from bot.memory import StoredTurn
from bot.replies import ReplyStream, post, typing_while

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
        self.last_trigger: dict[int, float] = {}
        self.early: dict[int, str | None] = {}  # message id -> edited text, or None if deleted

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

    # ---- events -----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if self.bot.user and message.author.id == self.bot.user.id:
            return
        if message.webhook_id is not None or message.author.bot:
            # Replies through our own webhooks are stored by the code that posts them.
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        guild_id = message.guild.id if message.guild else None
        policy = await policy_for(self.bot, message.channel, guild_id, message.author)
        if policy.mode == "off" or policy.refusal is not None:
            return
        if await self.memory.turn_for_message(message.id) is not None:
            return  # a dispatch seen twice (e.g. replayed after a reconnect)
        text = await message_text(message, self.bot.user, self.bot.settings.attachment_kb)
        if not text:
            return
        turn_id = await self.conv.record_user(
            message.channel.id,
            text,
            name=message.author.display_name,
            author_id=message.author.id,
            guild_id=guild_id,
            message_id=message.id,
        )
        if message.id in self.early:  # edited or deleted while we were storing it
            if (late := self.early.pop(message.id)) is None:
                await self.memory.delete_turn(turn_id)
                return
            await self.conv.edit(message.id, late)
        if not (policy.mode == "always" or await self.addressed(message)):
            return
        now = time.monotonic()
        cooldown = self.bot.settings.user_cooldown
        if now - self.last_trigger.get(message.author.id, -1e9) < cooldown:
            with contextlib.suppress(discord.HTTPException):
                await message.add_reaction("⏳")
            return
        self.last_trigger[message.author.id] = now
        task = asyncio.current_task()
        if task is not None:
            self.bot.track(task)
        await self.answer(message, turn_id)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if payload.message.author.bot:
            return
        text = await message_text(payload.message, self.bot.user, self.bot.settings.attachment_kb)
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

    # ---- replying ---------------------------------------------------------------------------

    async def answer(self, message: discord.Message, turn_id: int) -> None:
        """Generate and post the reply to `message`, then store it as the bot's turn."""
        channel = message.channel
        guild_id = message.guild.id if message.guild else None
        try:
            async with self.conv.slot(channel.id):
                await self.reply(channel, guild_id, turn_id, reference=message)
        except Busy:
            await post(channel, BUSY, reference=message)

    async def reply(
        self,
        channel: discord.abc.Messageable,
        guild_id: int | None,
        turn_id: int | None,
        *,
        reference: discord.Message | None = None,
        overrides: dict | None = None,
    ) -> list[discord.Message]:
        """Stream one reply into `channel` and store it; the caller holds the channel's slot."""
        settings = self.bot.settings
        shown = asyncio.Event()
        typing = asyncio.create_task(typing_while(channel, shown))
        job = None
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
            stream = ReplyStream(channel, reference, identity, interval=settings.stream_interval)
            if identity.webhook is not None:
                stream.recover = lambda: webhooks.fresh_identity(channel, job.persona, guild_id)
            async with asyncio.timeout(settings.reply_timeout):
                async for partial in self.conv.stream(job):
                    shown.set()
                    await stream.update(partial)
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
                )
            return messages
        except TimeoutError:
            log.error(
                "reply timed out in channel %s after %.0fs", channel.id, settings.reply_timeout
            )
            await post(channel, TIMEOUT, reference=reference)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "reply failed in channel %s (guild %s, turn %s, prompt %s tokens)",
                channel.id,
                guild_id,
                turn_id,
                job.prompt.tokens if job else "?",
            )
            try:
                await post(channel, APOLOGY, reference=reference)
            except discord.HTTPException:
                log.warning("could not post the apology in channel %s", channel.id)
        finally:
            shown.set()
            typing.cancel()
        return []

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
