"""`/help`: what the bot can do, listed from its own command tree (`bot.discord.help`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.answering import say_privately
from bot.discord.checks import is_manager
from bot.discord.help import help_text

if TYPE_CHECKING:
    from bot.discord.client import HermesBot


class Help(commands.Cog):
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot

    @app_commands.command(name="help", description="Every command the bot has, privately")
    async def help(self, interaction: discord.Interaction) -> None:
        text = help_text(self.bot.tree, manager=is_manager(interaction))
        await say_privately(
            interaction, "", embed=discord.Embed(title="Commands", description=text)
        )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Help(bot))
