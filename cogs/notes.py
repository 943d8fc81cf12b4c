"""`/note` (a channel's notes, always in the prompt) and `/me` (how the bot sees a member).

Only declarations: the notes and cards live in the store (`bot.store.notes`), what reaches the
prompt is chosen in `bot.prompt_context` and defused in `bot.prompt`. Who may edit a channel's
notes is the shared `edits_here` rule (a manager, or a member who may make the bot speak there);
`/note list` and `/me` need only `serves_here`. Every answer is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.answering import say_privately
from bot.discord.checks import audit, edits_here, serves_here
from bot.prompt import one_line
from bot.prompt_context import notes_that_fit, place_of_cards
from bot.store.notes import CARD_MAX_CHARS, NOTE_MAX_CHARS, NOTES_MAX

if TYPE_CHECKING:
    from bot.discord.client import HermesBot


class Notes(commands.Cog):
    note = app_commands.Group(name="note", description="Notes the bot keeps in mind here")
    me = app_commands.Group(name="me", description="How the bot sees you in this server")

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.memory = bot.memory

    # ---- /note ------------------------------------------------------------------------------

    @note.command(name="add", description="A note the bot keeps in every prompt here")
    @app_commands.describe(text=f"What to keep in mind (up to {NOTE_MAX_CHARS} characters)")
    @edits_here
    async def note_add(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 1, NOTE_MAX_CHARS]
    ) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        text = one_line(text)
        if not text or len(text) > NOTE_MAX_CHARS:
            await say_privately(
                interaction, f"A note is 1 to {NOTE_MAX_CHARS} characters (this one: {len(text)})."
            )
            return
        if len(await self.memory.notes.list(channel_id)) >= NOTES_MAX:
            await say_privately(
                interaction,
                f"This channel has {NOTES_MAX} notes already; remove one with `/note remove`.",
            )
            return
        position = await self.memory.notes.add(
            channel_id, text, guild_id=interaction.guild_id, author_id=interaction.user.id
        )
        await audit(interaction, "note.add", None, text, channel_id)
        notes = [n.text for n in await self.memory.notes.list(channel_id)]
        over = notes_that_fit(notes, self.bot.conv.counter, self.bot.settings.notes_tokens)
        warning = (
            f" The notes are over their budget (NOTES_TOKENS={self.bot.settings.notes_tokens}):"
            " `/note list` shows which are left out of the prompt."
            if over < len(notes)
            else ""
        )
        await say_privately(interaction, f"Noted (#{position}): {text}{warning}")

    @note.command(name="list", description="This channel's notes, numbered")
    @serves_here
    async def note_list(self, interaction: discord.Interaction) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        notes = [n.text for n in await self.memory.notes.list(channel_id)]
        if not notes:
            await say_privately(interaction, "No notes here. `/note add` keeps one in mind.")
            return
        kept = notes_that_fit(notes, self.bot.conv.counter, self.bot.settings.notes_tokens)
        lines = ["Notes here (in every prompt):"]
        for i, text in enumerate(notes, 1):
            left_out = " *(left out: over NOTES_TOKENS)*" if i > kept else ""
            lines.append(f"{i}. {text}{left_out}")
        await say_privately(interaction, "\n".join(lines)[:1990])

    @note.command(name="remove", description="Remove a note by its number in /note list")
    @app_commands.describe(number="The note's number in /note list")
    @edits_here
    async def note_remove(
        self, interaction: discord.Interaction, number: app_commands.Range[int, 1, NOTES_MAX]
    ) -> None:
        channel_id = interaction.channel_id
        assert channel_id is not None
        gone = await self.memory.notes.remove(channel_id, number)
        if gone is None:
            await say_privately(interaction, f"There is no note #{number} here; see `/note list`.")
            return
        await audit(interaction, "note.remove", gone.text, None, channel_id)
        await say_privately(interaction, f"Removed note #{number}: {gone.text}")

    # ---- /me --------------------------------------------------------------------------------

    @me.command(name="describe", description="How the bot should see you (a short card)")
    @app_commands.describe(text=f"Who you are, for the bot (up to {CARD_MAX_CHARS} characters)")
    @serves_here
    async def me_describe(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 1, CARD_MAX_CHARS]
    ) -> None:
        assert interaction.channel_id is not None
        text = one_line(text)
        if not text or len(text) > CARD_MAX_CHARS:
            await say_privately(
                interaction,
                f"A description is 1 to {CARD_MAX_CHARS} characters (this one: {len(text)}).",
            )
            return
        place = place_of_cards(interaction.channel_id, interaction.guild_id)
        await self.memory.member_cards.set(place, interaction.user.id, text)
        await say_privately(
            interaction, f"Saved. When you speak, the bot reads about you: {text}"
        )

    @me.command(name="clear", description="Remove your description")
    @serves_here
    async def me_clear(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        place = place_of_cards(interaction.channel_id, interaction.guild_id)
        gone = await self.memory.member_cards.clear(place, interaction.user.id)
        await say_privately(
            interaction, "Your description is gone." if gone else "You had no description here."
        )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Notes(bot))
