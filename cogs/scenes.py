"""`/persona scene ...`: put several personas in one channel and steer who speaks.

A subgroup of `/persona` (mounted by `cogs/personas.py`). The cast, its seating, mutes, policy
and scenario are stored by `bot.store.scenes`; who answers a message is decided by `bot.scenes` in
the chat cog. Every command uses the shared `speaks_here` check (members allowed to make the
bot speak in this channel); changes in servers are written to the audit log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, cast

import discord
from discord import app_commands

from bot.discord.answering import say_privately
from bot.discord.checks import audit, scene_at, speaks_here
from bot.personas import persona_key

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

#: A scene's own scenario text is held to this many characters.
SCENARIO_MAX = 2000


def _bot(interaction: discord.Interaction) -> HermesBot:
    return cast("HermesBot", interaction.client)


async def _cast_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    if interaction.channel_id is None:
        return []
    scene = await _bot(interaction).memory.scenes.get(interaction.channel_id)
    hits = [m.name for m in scene.members if current.lower() in m.name.lower()]
    return [app_commands.Choice(name=n, value=n) for n in hits[:25]]


async def _persona_autocomplete(
    interaction: discord.Interaction, current: str
) -> list[app_commands.Choice[str]]:
    names = await _bot(interaction).personas.names(interaction.guild_id)
    hits = [n for n in names if current.lower() in n.lower()]
    return [app_commands.Choice(name=n, value=n) for n in hits[:25]]


class SceneCommands(app_commands.Group):
    """`/persona scene`: several personas in this channel."""

    def __init__(self) -> None:
        super().__init__(name="scene", description="Several personas in this channel")

    @app_commands.command(name="add", description="Seat a persona in this channel's scene")
    @app_commands.describe(
        nicknames="Other names it answers to, comma-separated",
        talkativeness="0 to 1: how often it speaks when nobody is named (default: its card's)",
    )
    @app_commands.autocomplete(name=_persona_autocomplete)
    @speaks_here
    async def add(
        self,
        interaction: discord.Interaction,
        name: str,
        nicknames: str = "",
        talkativeness: app_commands.Range[float, 0.0, 1.0] | None = None,
    ) -> None:
        bot = _bot(interaction)
        channel_id = interaction.channel_id
        assert channel_id is not None
        persona = await bot.personas.get(name, interaction.guild_id)
        if persona is None:
            await say_privately(
                interaction, f"There is no persona called {name!r}. Try `/persona list`."
            )
            return
        scene = await bot.memory.scenes.get(channel_id)
        seated = any(persona_key(m.name) == persona_key(persona.name) for m in scene.members)
        limit = bot.settings.scene_max
        if not seated and len(scene.members) >= limit:
            await say_privately(
                interaction,
                f"This scene is full ({limit} personas). Remove one first "
                "(`/persona scene remove`).",
            )
            return
        nicks = [n.strip() for n in nicknames.split(",") if n.strip()][:10]
        await bot.memory.scenes.add_member(
            channel_id,
            interaction.guild_id,
            persona.name,
            nicknames=nicks,
            talkativeness=talkativeness,
        )
        await audit(interaction, "scene.add", None, persona.name)
        also = f" (also answers to {', '.join(nicks)})" if nicks else ""
        verb = "updated" if seated else "joins the scene"
        await say_privately(interaction, f"**{persona.name}** {verb}{also}.")

    @app_commands.command(name="remove", description="Take a persona out of the scene")
    @app_commands.autocomplete(name=_cast_autocomplete)
    @speaks_here
    async def remove(self, interaction: discord.Interaction, name: str) -> None:
        assert interaction.channel_id is not None
        if not await _bot(interaction).memory.scenes.remove_member(interaction.channel_id, name):
            await say_privately(interaction, f"{name!r} is not in this channel's scene.")
            return
        await audit(interaction, "scene.remove", name, None)
        await say_privately(interaction, f"**{name}** left the scene.")

    @app_commands.command(name="list", description="Who is in this channel's scene")
    async def list_(self, interaction: discord.Interaction) -> None:
        assert interaction.channel is not None
        scene = (await scene_at(_bot(interaction), interaction.channel, interaction.guild_id)).state
        if not scene.members:
            await say_privately(
                interaction, "No scene here. Add personas with `/persona scene add`."
            )
            return
        lines = []
        if scene.channel_id != interaction.channel.id:  # a thread following its channel's
            lines.append(
                f"(the scene of <#{scene.channel_id}>; adding here starts this thread's own)"
            )
        for m in scene.members:
            extra = []
            if m.nicknames:
                extra.append("also " + ", ".join(m.nicknames))
            if m.talkativeness is not None:
                extra.append(f"talkativeness {m.talkativeness:g}")
            if m.muted:
                extra.append("muted")
            lines.append(
                f"{m.seat + 1}. **{m.name}**" + (f" ({'; '.join(extra)})" if extra else "")
            )
        text = f"Scene ({scene.policy}):\n" + "\n".join(lines)
        if scene.scenario:
            text += f"\nScenario: {scene.scenario}"
        await say_privately(interaction, text)

    @app_commands.command(name="clear", description="End this channel's scene")
    @speaks_here
    async def clear(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        scene = await _bot(interaction).memory.scenes.get(interaction.channel_id)
        await _bot(interaction).memory.scenes.clear(interaction.channel_id)
        await audit(interaction, "scene.clear", [m.name for m in scene.members], None)
        await say_privately(interaction, "The scene is over; the channel's persona speaks alone.")

    @app_commands.command(name="next", description="Who speaks next (manual policy)")
    @app_commands.autocomplete(name=_cast_autocomplete)
    @speaks_here
    async def next_(self, interaction: discord.Interaction, name: str) -> None:
        assert interaction.channel_id is not None
        memory = _bot(interaction).memory
        scene = await memory.scenes.get(interaction.channel_id)
        member = next((m for m in scene.members if persona_key(m.name) == persona_key(name)), None)
        if member is None:
            await say_privately(interaction, f"{name!r} is not in this channel's scene.")
            return
        await memory.scenes.update(
            interaction.channel_id, interaction.guild_id, manual_next=member.name
        )
        note = "" if scene.policy == "manual" else " (the scene's policy is not `manual`, though)"
        await say_privately(
            interaction,
            f"**{member.name}** answers the next message that names nobody{note}.",
        )

    async def _mute(self, interaction: discord.Interaction, name: str, muted: bool) -> None:
        assert interaction.channel_id is not None
        memory = _bot(interaction).memory
        if not await memory.scenes.update_member(interaction.channel_id, name, muted=muted):
            await say_privately(interaction, f"{name!r} is not in this channel's scene.")
            return
        await audit(interaction, "scene.mute" if muted else "scene.unmute", None, name)
        state = "muted: it stays but does not speak" if muted else "back in the conversation"
        await say_privately(interaction, f"**{name}** is {state}.")

    @app_commands.command(name="mute", description="Keep a persona in the scene, silent")
    @app_commands.autocomplete(name=_cast_autocomplete)
    @speaks_here
    async def mute(self, interaction: discord.Interaction, name: str) -> None:
        await self._mute(interaction, name, True)

    @app_commands.command(name="unmute", description="Let a muted persona speak again")
    @app_commands.autocomplete(name=_cast_autocomplete)
    @speaks_here
    async def unmute(self, interaction: discord.Interaction, name: str) -> None:
        await self._mute(interaction, name, False)

    @app_commands.command(name="policy", description="Who speaks when a message names nobody")
    @app_commands.describe(
        policy="natural: by talkativeness; list: in seating order; manual: /persona scene next"
    )
    @speaks_here
    async def policy(
        self, interaction: discord.Interaction, policy: Literal["natural", "list", "manual"]
    ) -> None:
        assert interaction.channel_id is not None
        memory = _bot(interaction).memory
        old = (await memory.scenes.get(interaction.channel_id)).policy
        await memory.scenes.update(interaction.channel_id, interaction.guild_id, policy=policy)
        await audit(interaction, "scene.policy", old, policy)
        await say_privately(interaction, f"Scene policy: **{policy}**.")

    @app_commands.command(name="scenario", description="Scene text every member reads")
    @app_commands.describe(text="The situation; leave empty to remove it")
    @speaks_here
    async def scenario(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 0, SCENARIO_MAX] = "",
    ) -> None:
        assert interaction.channel_id is not None
        memory = _bot(interaction).memory
        old = (await memory.scenes.get(interaction.channel_id)).scenario
        await memory.scenes.update(interaction.channel_id, interaction.guild_id, scenario=text)
        await audit(interaction, "scene.scenario", old, text)
        await say_privately(interaction, "Scenario set." if text.strip() else "Scenario removed.")
