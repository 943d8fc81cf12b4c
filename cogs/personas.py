"""`/persona`: choose, import, create and share characters, and let them speak for themselves.

In server channels a persona speaks through a webhook the bot owns there, with the character's
name and face; where the bot may not manage webhooks, and in DMs, it falls back to its own
account with the name in bold.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.cards import MAX_CARD_BYTES, Card, CardError, export_card, parse_card
from bot.personas import DEFAULT_PERSONA, Persona, PersonaLibrary, fill, persona_key
from bot.replies import Identity, post, say_privately

if TYPE_CHECKING:
    from bot.app import HermesBot
    from bot.memory import StoredPersona

log = logging.getLogger(__name__)

WEBHOOK_NAME = "Hermes personas"
#: The most a modal's text input holds (Discord's limit); longer card fields cannot be edited there.
INPUT_MAX = 4000
NAME_MAX = 80
_NO_FACE = object()


def webhook_username_ok(name: str) -> bool:
    """Discord refuses webhook usernames containing "discord" or "clyde", and "everyone"/"here"."""
    lowered = name.casefold()
    return (
        "discord" not in lowered
        and "clyde" not in lowered
        and lowered.strip() not in ("everyone", "here")
    )


def avatar_bytes(persona: Persona) -> bytes | None:
    """The persona's image when it is a file or PNG bytes (URLs are used as they are)."""
    avatar = persona.card.avatar
    if isinstance(avatar, bytes):
        return avatar
    if isinstance(avatar, str) and not avatar.startswith(("http://", "https://")):
        try:
            return Path(avatar).read_bytes()
        except OSError:
            return None
    return None


def avatar_url(persona: Persona) -> str | None:
    avatar = persona.card.avatar
    return (
        avatar if isinstance(avatar, str) and avatar.startswith(("http://", "https://")) else None
    )


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
    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        #: webhooks checked this run, by the channel that owns them (a thread uses its parent's)
        self._hooks: dict[int, discord.Webhook] = {}
        self._hook_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        #: the picture each webhook shows now (a digest of the image; None: the default one)
        self._faces: dict[int, str | None] = {}
        super().__init__()

    @property
    def library(self) -> PersonaLibrary:
        assert self.bot.personas is not None
        return self.bot.personas

    @property
    def memory(self):  # noqa: ANN201
        assert self.bot.memory is not None
        return self.bot.memory

    async def resolve_name(self, guild_id: int | None, name: str) -> str | None:
        persona = await self.library.get(name, guild_id)
        return persona.name if persona else None

    # ---- speaking as the persona ------------------------------------------------------------

    @staticmethod
    def _parent(channel: discord.abc.Messageable) -> tuple[object, discord.Thread | None]:
        thread = channel if isinstance(channel, discord.Thread) else None
        return (channel.parent if thread is not None else channel), thread

    async def webhook_for(
        self, channel: discord.abc.Messageable
    ) -> tuple[discord.Webhook, discord.abc.Snowflake | None] | None:
        """The bot's webhook for this channel (a thread uses its parent's), made once and kept."""
        parent, thread = self._parent(channel)
        if not isinstance(
            parent, discord.TextChannel | discord.ForumChannel | discord.VoiceChannel
        ):
            return None
        async with self._hook_locks[parent.id]:  # one webhook, even for replies racing to make it
            if (known := self._hooks.get(parent.id)) is not None:
                return known, thread
            stored = await self.memory.webhook(parent.id)
            if stored is not None:
                hook = discord.Webhook.partial(stored[0], stored[1], client=self.bot)
                try:
                    await hook.fetch(prefer_auth=False)  # once a run: is it still there?
                except discord.NotFound:
                    log.info("webhook %s of channel %s is gone; making another", hook.id, parent.id)
                    await self.memory.forget_webhook(parent.id)
                except discord.HTTPException as exc:
                    log.info("could not check webhook %s (%s); using it anyway", hook.id, exc)
                    return hook, thread
                else:
                    self._hooks[parent.id] = hook
                    return hook, thread
            me = parent.guild.me
            if me is not None and not parent.permissions_for(me).manage_webhooks:
                return None
            try:
                hook = await parent.create_webhook(name=WEBHOOK_NAME, reason="persona replies")
            except discord.HTTPException as exc:
                log.info("no webhook in channel %s (%s); personas speak as the bot", parent.id, exc)
                return None
            assert hook.token is not None
            await self.memory.save_webhook(parent.id, hook.id, hook.token)
            self._hooks[parent.id] = hook
            self._faces[hook.id] = None  # a new webhook shows the default picture
            chat = self.bot.get_cog("Chat")
            if chat is not None:
                chat.webhook_ids.add(hook.id)  # type: ignore[attr-defined]
            return hook, thread

    async def forget_webhook(self, channel: discord.abc.Messageable) -> None:
        """Drop the channel's webhook (deleted by someone); the next reply makes a new one."""
        parent, _ = self._parent(channel)
        parent_id = getattr(parent, "id", None)
        if parent_id is not None:
            self._hooks.pop(parent_id, None)
            await self.memory.forget_webhook(parent_id)

    async def identity(
        self, channel: discord.abc.Messageable, name: str, guild_id: int | None = None
    ) -> Identity:
        guild = getattr(channel, "guild", None)
        persona = await self.library.get(name, guild_id or (guild.id if guild else None))
        if persona is None:
            return Identity()
        found = None
        if guild is not None and webhook_username_ok(persona.name[:NAME_MAX]):
            found = await self.webhook_for(channel)
        if found is None:
            return Identity(prefix=f"**{persona.name}:** ")
        hook, thread = found
        url = avatar_url(persona)
        if url is None:
            await self._show_face(hook, persona)
        return Identity(
            webhook=hook, username=persona.name[:NAME_MAX], avatar_url=url, thread=thread
        )

    async def _show_face(self, hook: discord.Webhook, persona: Persona) -> None:
        """A webhook message takes a URL avatar, not an image file: so for image-file avatars
        the webhook itself must wear the persona's face, and a persona without one the default
        face rather than the last persona's. Set only when it changes."""
        data = avatar_bytes(persona)
        face = hashlib.sha256(data).hexdigest() if data else None
        if self._faces.get(hook.id, _NO_FACE) == face:
            return
        try:
            await hook.edit(avatar=data, reason=f"persona {persona.name}")
        except (discord.HTTPException, ValueError) as exc:
            log.info("could not set the webhook avatar for %s: %s", persona.name, exc)
        self._faces[hook.id] = face  # not retried every message when Discord refuses it

    async def greet(
        self, channel: discord.abc.Messageable, persona: Persona, text: str, guild_id: int | None
    ) -> list[discord.Message]:
        """Post `text` as the persona; a webhook deleted behind our back is replaced once."""
        identity = await self.identity(channel, persona.name, guild_id)
        try:
            return await post(channel, text, identity=identity)  # type: ignore[arg-type]
        except discord.NotFound:
            if identity.webhook is None:
                raise
        await self.forget_webhook(channel)
        identity = await self.identity(channel, persona.name, guild_id)
        return await post(channel, text, identity=identity)  # type: ignore[arg-type]

    # ---- permissions ------------------------------------------------------------------------

    def manager(self, interaction: discord.Interaction) -> bool:
        perms = getattr(interaction.user, "guild_permissions", None)
        return (
            bool(perms and perms.manage_guild) or interaction.user.id in self.bot.settings.owner_ids
        )

    async def may_import(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None:
            return False
        guild = await self.memory.guild(interaction.guild_id)
        return guild.imports_allowed or self.manager(interaction)

    async def _own(self, interaction: discord.Interaction, name: str):  # noqa: ANN202
        """The server's own persona `name`, if this member may change it; else explain why not."""
        if interaction.guild_id is None:
            await say_privately(interaction, "Server personas live in servers, not DMs.")
            return None
        stored = await self.memory.get_persona(interaction.guild_id, name)
        if stored is None:
            builtin = self.library.builtins.get(name)
            await say_privately(
                interaction,
                f"**{builtin.name}** is built in and cannot be changed."
                if builtin
                else f"This server has no persona called {name!r}.",
            )
            return None
        if stored.created_by != interaction.user.id and not self.manager(interaction):
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
            [p.name for p in await self.memory.list_personas(interaction.guild_id)]
            if interaction.guild_id
            else []
        )
        current = None
        if interaction.channel_id:
            current = (await self.memory.channel(interaction.channel_id)).persona
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
    async def use(self, interaction: discord.Interaction, name: str) -> None:
        channel = interaction.channel
        chat = self.bot.get_cog("Chat")
        if chat is not None and await chat._refused(interaction, speaks=True):  # type: ignore[attr-defined]
            return  # blocked members, channels outside the allow-list, mode off
        persona = await self.library.get(name, interaction.guild_id)
        if persona is None or channel is None:
            await say_privately(
                interaction, f"There is no persona called {name!r}. Try `/persona list`."
            )
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        old = (await self.memory.channel(channel.id)).persona
        await self.memory.update_channel(channel.id, interaction.guild_id, persona=persona.name)
        if interaction.guild_id:
            await self.memory.audit(
                interaction.user.id,
                "persona.use",
                guild_id=interaction.guild_id,
                channel_id=channel.id,
                old=old,
                new=persona.name,
            )
        greetings = persona.greetings(getattr(interaction.user, "display_name", "you"))
        if greetings and persona_key(persona.name) != persona_key(DEFAULT_PERSONA):
            try:
                messages = await self.greet(channel, persona, greetings[0], interaction.guild_id)
            except discord.HTTPException as exc:
                log.warning("could not post %s's greeting in %s: %s", persona.name, channel.id, exc)
                await say_privately(
                    interaction,
                    f"**{persona.name}** is now playing in this channel, "
                    "but I could not post the greeting here.",
                )
                return
            assert self.bot.conv is not None
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
        old = (await self.memory.channel(interaction.channel_id)).persona
        await self.memory.update_channel(interaction.channel_id, interaction.guild_id, persona=None)
        if interaction.guild_id:
            await self.memory.audit(
                interaction.user.id,
                "persona.off",
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id,
                old=old,
                new=None,
            )
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
        await interaction.response.defer(ephemeral=True, thinking=True)
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
        existing = await self.memory.get_persona(guild_id, card.name)
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
            await self.memory.save_persona(guild_id, card.name, data, creator, avatar)
        elif existing is not None and existing.name == card.name:  # same name: in place
            await self.memory.save_persona(guild_id, card.name, data, creator, avatar, replace=True)
        elif existing is not None:  # only the case changed; names are unique whatever the case
            await self.memory.delete_persona(guild_id, previous.name)
            await self.memory.save_persona(guild_id, card.name, data, creator, avatar)
        else:  # a new name: the new row first, so a failure cannot lose the persona
            await self.memory.save_persona(guild_id, card.name, data, creator, avatar)
            await self.memory.delete_persona(guild_id, previous.name)
        if previous is not None:
            self.library.invalidate(guild_id, previous.name)
        self.library.invalidate(guild_id, card.name)
        await self.memory.audit(
            interaction.user.id,
            "persona.edit" if previous is not None else "persona.import",
            guild_id=guild_id,
            channel_id=interaction.channel_id,
            old=previous.name if previous is not None else None,
            new=card.name,
        )
        await say_privately(
            interaction, f"Saved **{card.name}**. Use it with `/persona use {card.name}`."
        )

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
        await self.memory.delete_persona(stored.guild_id, stored.name)
        self.library.invalidate(stored.guild_id, stored.name)
        await self.memory.audit(
            interaction.user.id,
            "persona.delete",
            guild_id=stored.guild_id,
            channel_id=interaction.channel_id,
            old=stored.name,
        )
        await say_privately(interaction, f"Deleted **{stored.name}**.")

    @app_commands.command(name="export", description="Download a persona as a Card V2 JSON file")
    @app_commands.autocomplete(name=name_autocomplete)
    async def export(self, interaction: discord.Interaction, name: str) -> None:
        persona = await self.library.get(name, interaction.guild_id)
        if persona is None:
            await say_privately(interaction, f"There is no persona called {name!r}.")
            return
        data = export_card(persona.card)
        filename = "".join(c for c in persona.name if c.isalnum() or c in "-_") or "persona"
        await say_privately(
            interaction,
            f"**{persona.name}** as a Character Card V2:",
            file=discord.File(io.BytesIO(data), f"{filename}.json"),
        )


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Personas(bot))
