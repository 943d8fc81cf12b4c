"""Who a reply is posted as: the bot's webhooks, a persona's name and face, and their recovery.

Part of the Discord layer, owned by the bot (`HermesBot.webhooks`) because every reply path needs
it. In server channels a persona speaks through a webhook the bot owns there, with the
character's name and face; where the bot may not manage webhooks, and in DMs, it falls back to
its own account with the name in bold. A webhook someone deleted is forgotten and replaced once.
The ids of the bot's webhooks tell the chat cog that a reply to one of them is a reply to the bot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import discord

from bot.discord.posting import Identity, post
from bot.memory import Memory
from bot.personas import Persona, PersonaLibrary

log = logging.getLogger(__name__)

WEBHOOK_NAME = "Hermes personas"
#: The longest webhook username Discord accepts (persona names are held to it too).
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


def _parent(channel: discord.abc.Messageable) -> tuple[object, discord.Thread | None]:
    """The channel that owns the webhook (a thread's parent), and the thread if any."""
    thread = channel if isinstance(channel, discord.Thread) else None
    return (thread.parent if thread is not None else channel), thread


class Webhooks:
    """The bot's webhooks, one per channel, and the identities replies are posted with."""

    def __init__(self, client: discord.Client, memory: Memory, personas: PersonaLibrary) -> None:
        self.client = client
        self.memory = memory
        self.personas = personas
        #: ids of every webhook the bot owns (stored ones, and those made this run)
        self.ids: set[int] = set()
        #: webhooks checked this run, by the channel that owns them (a thread uses its parent's)
        self._hooks: dict[int, discord.Webhook] = {}
        self._locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        #: the picture each webhook shows now (a digest of the image; None: the default one)
        self._faces: dict[int, str | None] = {}

    async def load(self) -> None:
        """Read the ids of the webhooks the bot made before this run."""
        self.ids = await self.memory.webhooks.ids()

    async def identity(
        self,
        channel: discord.abc.Messageable,
        persona_name: str | None,
        guild_id: int | None = None,
    ) -> Identity:
        """Who speaks as `persona_name` here: its webhook, its name in bold, or the bot itself."""
        if not persona_name:
            return Identity()
        guild = getattr(channel, "guild", None)
        persona = await self.personas.get(persona_name, guild_id or (guild.id if guild else None))
        if persona is None:
            return Identity()
        found = None
        if guild is not None and webhook_username_ok(persona.name[:NAME_MAX]):
            found = await self._webhook_for(channel)
        if found is None:
            return Identity(prefix=f"**{persona.name}:** ")
        hook, thread = found
        url = avatar_url(persona)
        if url is None:
            await self._show_face(hook, persona)
        return Identity(
            webhook=hook, username=persona.name[:NAME_MAX], avatar_url=url, thread=thread
        )

    async def fresh_identity(
        self,
        channel: discord.abc.Messageable,
        persona_name: str | None,
        guild_id: int | None = None,
    ) -> Identity:
        """Someone deleted the channel's webhook: forget it and make (or fall back from) a new one."""
        await self.forget(channel)
        return await self.identity(channel, persona_name, guild_id)

    async def post_as(
        self,
        channel: discord.abc.Messageable,
        persona_name: str,
        text: str,
        guild_id: int | None,
        *,
        reference: discord.Message | None = None,
    ) -> list[discord.Message]:
        """Post `text` as the persona; a webhook deleted behind our back is replaced once.
        `reference` is the message answered (shown as a reply where the bot posts itself)."""
        identity = await self.identity(channel, persona_name, guild_id)
        try:
            return await post(channel, text, identity=identity, reference=reference)
        except discord.NotFound:
            if identity.webhook is None:
                raise
        identity = await self.fresh_identity(channel, persona_name, guild_id)
        return await post(channel, text, identity=identity, reference=reference)

    async def forget(self, channel: discord.abc.Messageable) -> None:
        """Drop the channel's webhook (deleted by someone); the next reply makes a new one."""
        parent, _ = _parent(channel)
        parent_id = getattr(parent, "id", None)
        if parent_id is not None:
            self._hooks.pop(parent_id, None)
            await self.memory.webhooks.forget(parent_id)

    async def delete_messages(self, channel: discord.abc.Messageable, ids: list[int]) -> None:
        """Remove a reply's Discord messages, through our webhook if a persona posted them."""
        hook = await self.memory.webhooks.get(channel.id) if hasattr(channel, "id") else None
        for message_id in ids:
            try:
                if hook is not None:
                    webhook = discord.Webhook.partial(hook[0], hook[1], client=self.client)
                    try:
                        await webhook.delete_message(message_id)
                        continue
                    except discord.HTTPException:
                        pass
                await channel.get_partial_message(message_id).delete()  # type: ignore[attr-defined]
            except discord.HTTPException:
                log.warning("could not delete message %s", message_id)

    async def _webhook_for(
        self, channel: discord.abc.Messageable
    ) -> tuple[discord.Webhook, discord.abc.Snowflake | None] | None:
        """The bot's webhook for this channel (a thread uses its parent's), made once and kept."""
        parent, thread = _parent(channel)
        if not isinstance(
            parent, discord.TextChannel | discord.ForumChannel | discord.VoiceChannel
        ):
            return None
        async with self._locks[parent.id]:  # one webhook, even for replies racing to make it
            if (known := self._hooks.get(parent.id)) is not None:
                return known, thread
            hook = await self._stored(parent.id)
            if hook is None:
                hook = await self._create(parent)
            return (hook, thread) if hook is not None else None

    async def _stored(self, parent_id: int) -> discord.Webhook | None:
        """The webhook stored for the channel, if it still exists (checked once a run)."""
        stored = await self.memory.webhooks.get(parent_id)
        if stored is None:
            return None
        hook = discord.Webhook.partial(stored[0], stored[1], client=self.client)
        try:
            await hook.fetch(prefer_auth=False)
        except discord.NotFound:
            log.info("webhook %s of channel %s is gone; making another", hook.id, parent_id)
            await self.memory.webhooks.forget(parent_id)
            return None
        except discord.HTTPException as exc:
            log.info("could not check webhook %s (%s); using it anyway", hook.id, exc)
            return hook
        self._hooks[parent_id] = hook
        return hook

    async def _create(
        self, parent: discord.TextChannel | discord.ForumChannel | discord.VoiceChannel
    ) -> discord.Webhook | None:
        """A new webhook in `parent`, or None where the bot may not make one."""
        me = parent.guild.me
        if me is not None and not parent.permissions_for(me).manage_webhooks:
            return None
        try:
            hook = await parent.create_webhook(name=WEBHOOK_NAME, reason="persona replies")
        except discord.HTTPException as exc:
            log.info("no webhook in channel %s (%s); personas speak as the bot", parent.id, exc)
            return None
        assert hook.token is not None
        await self.memory.webhooks.save(parent.id, hook.id, hook.token)
        self._hooks[parent.id] = hook
        self._faces[hook.id] = None  # a new webhook shows the default picture
        self.ids.add(hook.id)
        return hook

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
