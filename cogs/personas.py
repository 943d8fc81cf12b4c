"""`/persona`: choose, import, create and share characters, and let them speak for themselves.

How a persona speaks (its webhook, name and face) is the Discord layer's, reached as the bot's
`webhooks` attribute (`bot/webhooks.py`). `/persona export` gives a card as JSON, or as
SillyTavern's PNG (the card inside the persona's picture). `/persona scene` (cogs/scenes.py)
seats several personas in one channel. Who may change a server's personas
uses the shared `bot.discord.checks.is_manager` rule; `/persona use` the shared `speaks_here` check.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.card_files import MAX_CARD_BYTES, export_png, parse_card
from bot.cards import Card, CardError, export_card
from bot.discord.answering import answers_at_once, say_privately
from bot.discord.checks import audit, is_manager, speaks_here
from bot.discord.webhooks import NAME_MAX, avatar_bytes, avatar_url
from bot.personas import DEFAULT_PERSONA, Persona, fill, persona_key
from cogs.scenes import SceneCommands

if TYPE_CHECKING:
    from bot.discord.client import HermesBot
    from bot.store.personas import StoredPersona

log = logging.getLogger(__name__)

#: The most a modal's text input holds (Discord's limit); longer card fields cannot be edited there.
INPUT_MAX = 4000


def summary_embed(persona: Persona) -> tuple[discord.Embed, discord.File | None]:
    card = persona.card
    text = fill(card.description, persona.name, "you").strip() or "*(no description)*"
    embed = discord.Embed(title=persona.name, description=text[:1500])
    if card.personality:
        embed.add_field(
            name="Personality",
            value=fill(card.personality, persona.name, "you")[:1000],
            inline=False,
        )
    if card.scenario:
        embed.add_field(
            name="Scenario", value=fill(card.scenario, persona.name, "you")[:1000], inline=False
        )
    if card.tags:
        embed.add_field(name="Tags", value=", ".join(card.tags)[:1000], inline=False)
    if not persona.builtin and persona.creator_id:
        # a field, not the footer: footers show mentions as raw <@id> text
        embed.add_field(name="Added by", value=f"<@{persona.creator_id}>", inline=False)
    source = "built-in" if persona.builtin else "this server's own"
    embed.set_footer(text=source + (f" · by {card.creator}" if card.creator else ""))
    file = None
    if url := avatar_url(persona):
        embed.set_thumbnail(url=url)
    elif data := avatar_bytes(persona):
        file = discord.File(io.BytesIO(data), "avatar.png")
        embed.set_thumbnail(url="attachment://avatar.png")
    return embed, file


class PersonaModal(discord.ui.Modal):
    """Create or edit a persona with the five fields that matter most."""

    def __init__(self, title: str, card: Card | None = None) -> None:
        super().__init__(title=title, timeout=600)
        card = card or Card(name="")
        self.name = discord.ui.TextInput(
            label="Name", default=card.name or None, max_length=NAME_MAX
        )
        self.description = discord.ui.TextInput(
            label="Description",
            style=discord.TextStyle.paragraph,
            max_length=INPUT_MAX,
            default=card.description or None,
        )
        self.personality = discord.ui.TextInput(
            label="Personality",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=INPUT_MAX,
            default=card.personality or None,
        )
        self.scenario = discord.ui.TextInput(
            label="Scenario",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=INPUT_MAX,
            default=card.scenario or None,
        )
        self.first_mes = discord.ui.TextInput(
            label="First message",
            style=discord.TextStyle.paragraph,
            required=False,
            max_length=INPUT_MAX,
            default=card.first_mes or None,
        )
        for item in (self.name, self.description, self.personality, self.scenario, self.first_mes):
            self.add_item(item)
        self.base = card
        self.result: Card | None = None
        self.interaction: discord.Interaction | None = None

    async def on_submit(self, interaction: discord.Interaction) -> None:
        base = self.base
        self.result = Card(
            name=" ".join(self.name.value.split()),
            description=self.description.value,
            personality=self.personality.value,
            scenario=self.scenario.value,
            first_mes=self.first_mes.value,
            mes_example=base.mes_example,
            creator_notes=base.creator_notes,
            system_prompt=base.system_prompt,
            post_history_instructions=base.post_history_instructions,
            alternate_greetings=list(base.alternate_greetings),
            character_book=base.character_book,
            tags=list(base.tags),
            creator=base.creator or interaction.user.name,
            character_version=base.character_version,
            extensions=dict(base.extensions),
            extra=dict(base.extra),
        )
        self.interaction = interaction
        await interaction.response.defer(ephemeral=True, thinking=True)
        self.stop()


class Personas(
    commands.GroupCog, group_name="persona", group_description="Characters the bot plays"
):
    #: `/persona scene ...` (cogs/scenes.py): several personas in one channel
    scene = SceneCommands()

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.library = bot.personas
        self.memory = bot.memory
        super().__init__()

    # ---- permissions ------------------------------------------------------------------------

    async def may_import(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            return False
        guild = await self.memory.places.guild(interaction.guild_id)
        return guild.imports_allowed or is_manager(interaction)

    async def _own(self, interaction: discord.Interaction, name: str) -> StoredPersona | None:
        """The server's own persona `name`, if this member may change it; else explain why not."""
        if interaction.guild_id is None:
            await say_privately(interaction, "Server personas live in servers, not DMs.")
            return None
        stored = await self.memory.personas.get(interaction.guild_id, name)
        if stored is None:
            builtin = self.library.builtins.get(name)
            await say_privately(
                interaction,
                f"**{builtin.name}** is built in and cannot be changed."
                if builtin
                else f"This server has no persona called {name!r}.",
            )
            return None
        if stored.created_by != interaction.user.id and not is_manager(interaction):
            await say_privately(
                interaction,
                f"Only <@{stored.created_by}> (who made **{stored.name}**) "
                "or a member with Manage Server can change it.",
            )
            return None
        return stored

    # ---- commands ---------------------------------------------------------------------------

    async def name_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = await self.library.names(interaction.guild_id)
        hits = [n for n in names if current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in hits[:25]]

    @app_commands.command(name="list", description="Built-in personas and this server's own")
    async def list_(self, interaction: discord.Interaction) -> None:
        builtins = [p.name for p in self.library.builtins.values()]
        own = (
            [p.name for p in await self.memory.personas.in_guild(interaction.guild_id)]
            if interaction.guild_id
            else []
        )
        current = None
        if interaction.channel_id:
            current = (await self.memory.places.channel(interaction.channel_id)).persona
        text = "**Built-in:** " + ", ".join(builtins)
        text += "\n**This server:** " + (", ".join(own) if own else "none yet (`/persona import`)")
        text += f"\nIn this channel: **{current or DEFAULT_PERSONA}**"
        await say_privately(interaction, text)

    @app_commands.command(name="show", description="A persona's card")
    @app_commands.autocomplete(name=name_autocomplete)
    async def show(self, interaction: discord.Interaction, name: str) -> None:
        persona = await self.library.get(name, interaction.guild_id)
        if persona is None:
            await say_privately(
                interaction, f"There is no persona called {name!r}. Try `/persona list`."
            )
            return
        embed, file = summary_embed(persona)
        if file is not None:
            await say_privately(interaction, "", embed=embed, file=file)
        else:
            await say_privately(interaction, "", embed=embed)

    @app_commands.command(name="use", description="Play this persona in this channel")
    @app_commands.autocomplete(name=name_autocomplete)
    @speaks_here  # not for blocked members, channels outside the allow-list, or mode off
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        channel = interaction.channel
        persona = await self.library.get(name, interaction.guild_id)
        if persona is None or channel is None:
            await say_privately(
                interaction, f"There is no persona called {name!r}. Try `/persona list`."
            )
            return
        old = (await self.memory.places.channel(channel.id)).persona
        await self.memory.places.update_channel(
            channel.id, interaction.guild_id, persona=persona.name
        )
        await audit(interaction, "persona.use", old, persona.name, channel.id)
        greetings = persona.greetings(getattr(interaction.user, "display_name", "you"))
        if greetings and persona_key(persona.name) != persona_key(DEFAULT_PERSONA):
            try:
                messages = await self.bot.webhooks.post_as(
                    channel, persona.name, greetings[0], interaction.guild_id
                )
            except discord.HTTPException as exc:
                log.warning("could not post %s's greeting in %s: %s", persona.name, channel.id, exc)
                await say_privately(
                    interaction,
                    f"**{persona.name}** is now playing in this channel, "
                    "but I could not post the greeting here.",
                )
                return
            await self.bot.conv.record_assistant(
                channel.id,
                greetings[0],
                guild_id=interaction.guild_id,
                persona=persona.name,
                message_ids=[m.id for m in messages],
                name=persona.name,
            )
        await say_privately(interaction, f"**{persona.name}** is now playing in this channel.")

    @app_commands.command(name="off", description="Back to the default persona here")
    async def off(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        old = (await self.memory.places.channel(interaction.channel_id)).persona
        await self.memory.places.update_channel(
            interaction.channel_id, interaction.guild_id, persona=None
        )
        await audit(interaction, "persona.off", old, None)
        await say_privately(interaction, "Back to the default persona in this channel.")

    @app_commands.command(name="import", description="Import a Character Card (PNG or JSON)")
    @app_commands.guild_only()
    async def import_(self, interaction: discord.Interaction, card: discord.Attachment) -> None:
        if not await self.may_import(interaction):
            await say_privately(
                interaction, "Only members with Manage Server may import personas here."
            )
            return
        if card.size > MAX_CARD_BYTES:
            await say_privately(
                interaction,
                f"Not imported: the file is {card.size / 2**20:.1f} MB; cards may be at most 2 MB.",
            )
            return
        try:
            parsed = parse_card(await card.read(), card.filename)
        except CardError as exc:
            await say_privately(interaction, f"Not imported: {exc}")
            return
        except discord.HTTPException:
            await say_privately(interaction, "Not imported: I could not download the attachment.")
            return
        await self._store(interaction, parsed)

    async def _store(
        self,
        interaction: discord.Interaction,
        card: Card,
        *,
        previous: StoredPersona | None = None,
    ) -> None:
        """Save an imported or written card; with `previous`, that persona edited (maybe renamed).

        Nothing is removed before the new version is safe: a rename onto a built-in's or another
        persona's name is refused, and the persona keeps its creator whoever edits it.
        """
        assert interaction.guild_id is not None
        guild_id = interaction.guild_id
        card.name = " ".join(card.name.split())
        if not card.name:
            await say_privately(interaction, "Not saved: the persona needs a name.")
            return
        if card.name in self.library.builtins:
            await say_privately(
                interaction, f"Not saved: **{card.name}** is a built-in persona's name."
            )
            return
        existing = await self.memory.personas.get(guild_id, card.name)
        if existing is not None and (previous is None or existing.id != previous.id):
            await say_privately(
                interaction,
                f"Not saved: this server already has **{existing.name}**. "
                + (
                    "Use `/persona edit`, or delete it first."
                    if previous is None
                    else "Choose another name."
                ),
            )
            return
        avatar = card.avatar if isinstance(card.avatar, bytes) else None
        data = export_card(card).decode()
        creator = previous.created_by if previous is not None else interaction.user.id
        if previous is None:
            await self.memory.personas.save(guild_id, card.name, data, creator, avatar)
        elif existing is not None and existing.name == card.name:  # same name: in place
            await self.memory.personas.save(
                guild_id, card.name, data, creator, avatar, replace=True
            )
        elif existing is not None:  # only the case changed; names are unique whatever the case
            await self.memory.personas.delete(guild_id, previous.name)
            await self.memory.personas.save(guild_id, card.name, data, creator, avatar)
        else:  # a new name: the new row first, so a failure cannot lose the persona
            await self.memory.personas.save(guild_id, card.name, data, creator, avatar)
            await self.memory.personas.delete(guild_id, previous.name)
        if previous is not None:
            self.library.invalidate(guild_id, previous.name)
        self.library.invalidate(guild_id, card.name)
        await audit(
            interaction,
            "persona.edit" if previous is not None else "persona.import",
            previous.name if previous is not None else None,
            card.name,
        )
        await say_privately(
            interaction, f"Saved **{card.name}**. Use it with `/persona use {card.name}`."
        )

    @answers_at_once  # its answer is the form
    @app_commands.command(name="create", description="Write a new persona")
    @app_commands.guild_only()
    async def create(self, interaction: discord.Interaction) -> None:
        if not await self.may_import(interaction):
            await say_privately(
                interaction, "Only members with Manage Server may create personas here."
            )
            return
        modal = PersonaModal("New persona")
        await interaction.response.send_modal(modal)
        if await modal.wait() or modal.result is None or modal.interaction is None:
            return  # timed out
        await self._store(modal.interaction, modal.result)

    @answers_at_once  # its answer is the form
    @app_commands.command(name="edit", description="Edit one of this server's personas")
    @app_commands.guild_only()
    @app_commands.autocomplete(name=name_autocomplete)
    async def edit(self, interaction: discord.Interaction, name: str) -> None:
        stored = await self._own(interaction, name)
        if stored is None:
            return
        card = parse_card(stored.card.encode())
        # Discord refuses a form whose prefilled text is longer than its input allows
        fields = {"name": NAME_MAX, "description": INPUT_MAX, "personality": INPUT_MAX}
        fields |= {"scenario": INPUT_MAX, "first_mes": INPUT_MAX}
        too_long = [f for f, limit in fields.items() if len(getattr(card, f)) > limit]
        if too_long:
            await say_privately(
                interaction,
                f"**{stored.name}** is too long to edit in a Discord form ({', '.join(too_long)}: "
                f"a form holds at most {INPUT_MAX} characters a field, {NAME_MAX} for the name). "
                "Export it, edit the file, then delete it and import the file again.",
            )
            return
        modal = PersonaModal(f"Edit {stored.name}"[:45], card)
        await interaction.response.send_modal(modal)
        if await modal.wait() or modal.result is None or modal.interaction is None:
            return
        result = modal.result
        result.avatar = stored.avatar
        await self._store(modal.interaction, result, previous=stored)

    @app_commands.command(name="delete", description="Delete one of this server's personas")
    @app_commands.guild_only()
    @app_commands.autocomplete(name=name_autocomplete)
    async def delete(self, interaction: discord.Interaction, name: str) -> None:
        stored = await self._own(interaction, name)
        if stored is None:
            return
        await self.memory.personas.delete(stored.guild_id, stored.name)
        self.library.invalidate(stored.guild_id, stored.name)
        await audit(interaction, "persona.delete", stored.name)
        await say_privately(interaction, f"Deleted **{stored.name}**.")

    @app_commands.command(name="export", description="Download a persona as a Character Card V2")
    @app_commands.describe(format="json, or png: the card inside the persona's picture")
    @app_commands.autocomplete(name=name_autocomplete)
    async def export(
        self,
        interaction: discord.Interaction,
        name: str,
        format: Literal["json", "png"] = "json",
    ) -> None:
        persona = await self.library.get(name, interaction.guild_id)
        if persona is None:
            await say_privately(interaction, f"There is no persona called {name!r}.")
            return
        filename = "".join(c for c in persona.name if c.isalnum() or c in "-_") or "persona"
        text, file = f"**{persona.name}** as a Character Card V2:", None
        if format == "png":
            text, file = card_png(persona, filename)
        if file is None:
            file = discord.File(io.BytesIO(export_card(persona.card)), f"{filename}.json")
        await say_privately(interaction, text, file=file)


def card_png(persona: Persona, filename: str) -> tuple[str, discord.File | None]:
    """The persona's picture with its card inside (SillyTavern's PNG card), or why not."""
    image = avatar_bytes(persona)
    if image is None:
        return f"**{persona.name}** has no picture to hold the card, so here it is as JSON:", None
    try:
        data = export_png(persona.card, image)
    except CardError as exc:
        return (
            f"**{persona.name}**'s picture cannot hold the card ({exc}); here it is as JSON:",
            None,
        )
    return f"**{persona.name}** as a Character Card V2 PNG:", discord.File(
        io.BytesIO(data), f"{filename}.png"
    )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Personas(bot))
