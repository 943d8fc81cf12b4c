"""Slash-command checks, and the channel policy as Discord sees it.

Part of the Discord layer. `is_manager` is the one "Manage Server, or a user in OWNER_IDS"
rule and `require_manager` its check (the whole `/admin` group runs it); `serves_here`,
`speaks_here` and `edits_here` are `app_commands` checks on the channel policy (`bot.policy`),
the last one letting managers through as well; `scene_at` the scene in force in a channel (a
thread's parent's, unless it has its own); `audit` writes
what a command changed to the server's audit log. A check that
refuses raises `Refused`, whose message the bot's app-command error handler sends privately,
once for every command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord
from discord import app_commands

from bot.policy import Asker, ChannelPolicy, Place, resolve, scene_channel
from bot.scenes import Scene, load_scene

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

NOT_MANAGER = "You need the Manage Server permission to use this command."


class Refused(app_commands.CheckFailure):
    """A check said no; `str(error)` is the one line the member is told."""


def place_of(channel: discord.abc.Snowflake, guild_id: int | None) -> Place:
    """Describe a Discord channel for the policy; a thread names its parent channel."""
    return Place(
        channel_id=channel.id,
        guild_id=guild_id,
        parent_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        direct=isinstance(channel, discord.DMChannel | discord.GroupChannel),
    )


def asker_of(user: discord.abc.User) -> Asker:
    return Asker(user.id, frozenset(r.id for r in getattr(user, "roles", ())))


async def policy_for(
    bot: HermesBot,
    channel: discord.abc.Snowflake,
    guild_id: int | None,
    user: discord.abc.User | None = None,
) -> ChannelPolicy:
    """The channel policy at `channel`; with `user`, whether they may use the bot there."""
    asker = asker_of(user) if user is not None else None
    return await resolve(bot.memory, bot.settings, place_of(channel, guild_id), asker)


async def scene_at(bot: HermesBot, channel: discord.abc.Snowflake, guild_id: int | None) -> Scene:
    """The scene in force in `channel`: its own cast, else a thread's parent's
    (`bot.policy.scene_channel`); empty where there is none."""
    where = await scene_channel(bot.memory, place_of(channel, guild_id))
    return await load_scene(bot.memory, bot.personas, where, guild_id)


def is_owner(interaction: discord.Interaction) -> bool:
    """A bot owner: a user in OWNER_IDS."""
    return interaction.user.id in cast("HermesBot", interaction.client).settings.owner_ids


def is_manager(interaction: discord.Interaction) -> bool:
    """Manage Server in this server, or a bot owner (OWNER_IDS) anywhere."""
    if is_owner(interaction):
        return True
    perms = getattr(interaction.user, "guild_permissions", None)
    return bool(interaction.guild and perms and perms.manage_guild)


async def require_manager(interaction: discord.Interaction) -> bool:
    """The `is_manager` rule as a check: refuses with `NOT_MANAGER`."""
    if not is_manager(interaction):
        raise Refused(NOT_MANAGER)
    return True


async def audit(
    interaction: discord.Interaction,
    action: str,
    old: object = None,
    new: object = None,
    channel_id: int | None = None,
) -> None:
    """Write what `interaction`'s user changed to the server's audit log (`/admin audit`):
    the one way commands audit. Nothing outside a server: the log is kept per server."""
    if interaction.guild_id is None:
        return
    await cast("HermesBot", interaction.client).memory.audit.write(
        interaction.user.id,
        action,
        guild_id=interaction.guild_id,
        channel_id=channel_id or interaction.channel_id,
        old=old,
        new=new,
    )


async def _policy_refusal(interaction: discord.Interaction, *, speaks: bool) -> bool:
    bot = cast("HermesBot", interaction.client)
    channel = interaction.channel
    if channel is None:
        return True
    policy = await policy_for(bot, channel, interaction.guild_id, interaction.user)
    refusal = policy.refusal_to_speak() if speaks else policy.refusal
    if refusal is not None:
        raise Refused(refusal)
    return True


async def _serves(interaction: discord.Interaction) -> bool:
    return await _policy_refusal(interaction, speaks=False)


async def _speaks(interaction: discord.Interaction) -> bool:
    return await _policy_refusal(interaction, speaks=True)


#: The member may use the bot in this channel (not blocked; the channel is served).
serves_here = app_commands.check(_serves)
#: As `serves_here`, and the channel is not switched off: for commands that make the bot speak.
speaks_here = app_commands.check(_speaks)


async def _edits(interaction: discord.Interaction) -> bool:
    if is_manager(interaction):
        return True
    return await _policy_refusal(interaction, speaks=True)


#: Who may change what the bot keeps for a channel (its notes): a manager, or a member who may
#: make the bot speak there, as choosing the channel's persona (`/persona use`) requires.
edits_here = app_commands.check(_edits)
