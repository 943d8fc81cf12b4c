"""Talking to the bot: the chat listeners, the user commands `/reset`, `/regenerate` and
`/continue`, and the message commands "Hide from the bot" and "Edit remembered text"
(`bot.discord.remembered`).

Only declarations: each listener hands its event to the Discord layer and is done. A message
goes to ingest (`bot.discord.ingest`: the channel policy decides whether it is stored and
answered), an owed reply to the reply runner (`bot.discord.replying`, which in a channel with a
scene lets the cast answer), a new gateway session to catch-up (`bot.discord.catchup`). Edits
and deletes follow the stored turns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.conversation import Busy
from bot.discord import remembered
from bot.discord.answering import answers_at_once, say_privately
from bot.discord.checks import audit, is_manager, serves_here, speaks_here
from bot.discord.replying import APOLOGY, BUSY
from bot.store.turns import StoredTurn

if TYPE_CHECKING:
    from bot.discord.client import HermesBot


class Chat(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot

    # ---- events -----------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        bot = self.bot
        taken = await bot.ingest.take(message)
        if taken is None:
            return
        task = asyncio.current_task()
        if task is not None:
            bot.track(task)
        if taken.speakers and taken.scene is not None:
            await bot.replies.answer_scene(message, taken.owed, taken.scene, taken.speakers)
        else:
            await bot.replies.answer(message, taken.owed, taken.channel)

    @commands.Cog.listener()
    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        await self.bot.ingest.edited(payload)

    @commands.Cog.listener()
    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self.bot.ingest.deleted([payload.message_id])

    @commands.Cog.listener()
    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self.bot.ingest.deleted(list(payload.message_ids))

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """A new gateway session (the first, or one after the old could not be resumed):
        nothing missed meanwhile will be replayed, so read it back."""
        self.bot.track(asyncio.create_task(self.bot.catch_up.run(), name="catch-up"))

    # ---- user commands ----------------------------------------------------------------------

    @app_commands.command(name="reset", description="Forget this conversation")
    @serves_here
    async def reset(self, interaction: discord.Interaction) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        memory = self.bot.memory
        if interaction.guild_id is not None:
            guild = await memory.places.guild(interaction.guild_id)
            if not (guild.reset_allowed or is_manager(interaction)):
                await say_privately(interaction, "An admin has not allowed /reset in this server.")
                return
        old = (await memory.places.channel(channel_id)).forget_before
        new = await memory.turns.forget(channel_id, interaction.guild_id)
        await audit(interaction, "reset", old, new, channel_id)
        await say_privately(interaction, "Done: I forgot our conversation here.")

    @contextlib.asynccontextmanager
    async def _last_reply(
        self, interaction: discord.Interaction, verb: str
    ) -> AsyncIterator[StoredTurn | None]:
        """Hold the channel and yield the bot's last reply there, or None once answered.

        Waits for the channel's turn (the command was deferred: generation outlasts Discord's
        3 s), and reads the reply again then: a /regenerate or /reset that ran while this one
        waited may have replaced or hidden it. (The `speaks_here` check has already let the
        member in.)
        """
        channel = interaction.channel
        assert channel is not None
        nothing = f"I have no reply here to {verb}."
        memory = self.bot.memory
        if await memory.turns.last_assistant(channel.id) is None:
            await say_privately(interaction, nothing)
            yield None
            return
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.bot.conv.slot(channel.id))
            except Busy:
                await say_privately(interaction, BUSY)
                yield None
                return
            last = await memory.turns.last_assistant(channel.id)
            if last is None:
                await say_privately(interaction, nothing)
            yield last

    @app_commands.command(name="regenerate", description="Replace my last reply here")
    @speaks_here
    async def regenerate(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        async with self._last_reply(interaction, "regenerate") as last:
            if last is None or channel is None:
                return
            done = await self.bot.replies.regenerate(channel, interaction.guild_id, last)  # type: ignore[arg-type]
        await say_privately(
            interaction, "Regenerated." if done else f"{APOLOGY} (My previous reply stays.)"
        )

    @app_commands.command(name="continue", description="Make my last reply longer")
    @speaks_here
    async def continue_(self, interaction: discord.Interaction) -> None:
        channel = interaction.channel
        async with self._last_reply(interaction, "continue") as last:
            if last is None or channel is None:
                return
            result = await self.bot.replies.extend(channel, interaction.guild_id, last)  # type: ignore[arg-type]
        if result.failure == "":  # someone spoke after my reply: it is no longer mine to extend
            answer = "My last reply is no longer the latest message here, so I can't continue it."
        elif result.failure is not None:  # a failing or stuck model: said so, nothing changed
            answer = APOLOGY
        elif result.empty:
            answer = "I had nothing to add."
        else:
            answer = "Continued."
        await say_privately(interaction, answer)


@app_commands.context_menu(name="Hide from the bot")
@serves_here
async def hide_from_bot(interaction: discord.Interaction, message: discord.Message) -> None:
    await remembered.hide(interaction, message)


@answers_at_once  # its answer is a form
@app_commands.context_menu(name="Edit remembered text")
@serves_here
async def edit_remembered(interaction: discord.Interaction, message: discord.Message) -> None:
    await remembered.open_editor(interaction, message)


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Chat(bot))
    bot.tree.add_command(hide_from_bot)
    bot.tree.add_command(edit_remembered)
