"""Putting a reply into Discord: streaming edits, the 2000-character split, code fences, pings.

Part of the Discord layer (with `app`, `webhooks` and `checks`, the only modules of `bot/` that
import discord.py): everything the bot posts goes through a `ReplyStream`, so no path can forget
`AllowedMentions` or the length limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

log = logging.getLogger(__name__)

LIMIT = 2000
#: Nobody is pinged by anything the bot posts: not everyone/here, not roles, not users, and the
#: author of the message it replies to neither.
NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=False)

_FENCE = re.compile(r"^\s*(```+|~~~+)(\S*)", re.MULTILINE)


def _open_fence(text: str) -> str | None:
    """The opening line (e.g. "```python") of a code block left open at the end of `text`."""
    open_line: str | None = None
    for m in _FENCE.finditer(text):
        if open_line is None:
            open_line = m.group(1) + m.group(2)
        elif m.group(1).startswith(open_line[:3]):
            open_line = None
    return open_line


def _cut_point(text: str, limit: int) -> int:
    """Where to end a chunk of at most `limit` chars: paragraph, then line, then sentence, word."""
    window = text[:limit]
    for sep, keep in (("\n\n", 0), ("\n", 0), (". ", 1), ("! ", 1), ("? ", 1), (" ", 0)):
        at = window.rfind(sep)
        if at > limit // 3:
            return at + keep
    return limit


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """Split `text` into chunks of at most `limit` characters at natural boundaries.

    A code block still open at the end of a chunk is closed there and reopened (with its
    language) at the start of the next, so every chunk renders on its own.
    """
    chunks: list[str] = []
    rest = text.strip()
    reopen = ""
    while rest:
        body = reopen + rest
        if len(body) <= limit:
            chunks.append(body)
            break
        room = limit - 4  # space for a closing "\n```"
        cut = _cut_point(body, room)
        if cut <= len(reopen):  # the reopened fence alone must not be a chunk
            cut = room
        chunk = body[:cut].rstrip()
        fence = _open_fence(chunk)
        if fence:
            chunk += "\n" + fence[:3]
        chunks.append(chunk)
        rest = body[cut:].lstrip("\n ") if not fence else body[cut:].lstrip("\n")
        reopen = fence + "\n" if fence else ""
    return chunks or [""]


def humanize(message: discord.Message, bot_user: discord.abc.User | None = None) -> str:
    """Message text for the prompt: mention markup becomes readable names.

    discord.py's `clean_content` turns `<@id>`, `<@!id>`, `<#id>` and `<@&id>` into @name,
    #channel and @role; a leading mention of the bot itself is dropped, being only the trigger.
    """
    text = message.clean_content
    if bot_user is not None:
        for form in (f"@{getattr(bot_user, 'display_name', bot_user.name)}", f"@{bot_user.name}"):
            if text.startswith(form):
                text = text[len(form) :]
                break
    return text.strip()


@dataclass(slots=True)
class Identity:
    """Who the reply is posted as: the bot itself, or a persona through a webhook."""

    webhook: discord.Webhook | None = None
    username: str | None = None
    avatar_url: str | None = None
    prefix: str = ""  # e.g. "**Aria:** " when a persona must speak through the bot's own account
    thread: discord.abc.Snowflake | None = None


@dataclass
class ReplyStream:
    """Streams a growing reply into one or more messages, editing at most every `interval` s."""

    channel: discord.abc.Messageable
    reference: discord.Message | None = None
    identity: Identity = field(default_factory=Identity)
    interval: float = 1.2
    messages: list[discord.Message] = field(default_factory=list)
    #: Called once when the webhook turns out to be deleted before the first message: returns
    #: the identity to use instead (a fresh webhook, or the bot's own account).
    recover: Callable[[], Awaitable[Identity]] | None = None
    _shown: list[str] = field(default_factory=list)
    _last_edit: float = 0.0

    async def _send(self, content: str) -> discord.Message:
        try:
            return await self._send_as(content)
        except discord.NotFound:
            if self.identity.webhook is None or self.recover is None or self.messages:
                raise
            recover, self.recover = self.recover, None
            self.identity = await recover()
            return await self._send_as(content)

    async def _send_as(self, content: str) -> discord.Message:
        ident = self.identity
        if ident.webhook is not None:
            kwargs: dict[str, Any] = {
                "username": ident.username,
                "wait": True,
                "allowed_mentions": NO_PINGS,
            }
            if ident.avatar_url:
                kwargs["avatar_url"] = ident.avatar_url
            if ident.thread is not None:
                kwargs["thread"] = ident.thread
            return await ident.webhook.send(content, **kwargs)
        if self.reference is not None and not self.messages:
            return await self.reference.reply(
                content, mention_author=False, allowed_mentions=NO_PINGS
            )
        return await self.channel.send(content, allowed_mentions=NO_PINGS)

    async def _edit(self, message: discord.Message, content: str) -> None:
        ident = self.identity
        if ident.webhook is not None:
            kwargs: dict[str, Any] = {"content": content, "allowed_mentions": NO_PINGS}
            if ident.thread is not None:
                kwargs["thread"] = ident.thread
            await ident.webhook.edit_message(message.id, **kwargs)
        else:
            await message.edit(content=content, allowed_mentions=NO_PINGS)

    def _chunks(self, text: str) -> list[str]:
        return split_message(self.identity.prefix + text)

    async def update(self, text: str) -> None:
        """Show the reply so far, unless the last edit was less than `interval` ago."""
        if time.monotonic() - self._last_edit < self.interval and self.messages:
            return
        await self._render(self._chunks(text), final=False)

    async def finish(self, text: str) -> list[discord.Message]:
        """Show the final text exactly; returns every message that holds it."""
        await self._render(self._chunks(text), final=True)
        return self.messages

    async def _render(self, chunks: list[str], *, final: bool) -> None:
        if not final:
            # While streaming, only the last chunk grows; earlier ones are settled when a new
            # chunk starts.
            chunks = [c for c in chunks if c.strip()]
            if not chunks:
                return
        for i, chunk in enumerate(chunks):
            if i < len(self.messages):
                if self._shown[i] != chunk:
                    await self._edit(self.messages[i], chunk)
                    self._shown[i] = chunk
            else:
                self.messages.append(await self._send(chunk))
                self._shown.append(chunk)
        if final:
            for message in self.messages[len(chunks) :]:  # the final text got shorter
                try:
                    if self.identity.webhook is not None:
                        await self.identity.webhook.delete_message(message.id)
                    else:
                        await message.delete()
                except discord.HTTPException:
                    log.warning("could not delete surplus reply message %s", message.id)
            del self.messages[len(chunks) :], self._shown[len(chunks) :]
        self._last_edit = time.monotonic()


async def post(
    channel: discord.abc.Messageable,
    text: str,
    *,
    reference: discord.Message | None = None,
    identity: Identity | None = None,
) -> list[discord.Message]:
    """Post a complete text (notices, greetings) with the same splitting and ping rules."""
    stream = ReplyStream(channel, reference, identity or Identity(), interval=0)
    return await stream.finish(text)


async def say_privately(interaction: discord.Interaction, text: str, **kwargs: Any) -> None:
    """An ephemeral answer, or a follow-up once the interaction was answered; never pings."""
    kwargs.setdefault("allowed_mentions", NO_PINGS)
    if interaction.response.is_done():
        await interaction.followup.send(text, ephemeral=True, **kwargs)
    else:
        await interaction.response.send_message(text, ephemeral=True, **kwargs)


async def typing_while(channel: discord.abc.Messageable, until: asyncio.Event) -> None:
    """Keep the typing indicator on until `until` is set (Discord drops it after ~10 s)."""
    try:
        while not until.is_set():
            try:
                await channel.typing()
            except discord.HTTPException:
                return
            try:
                await asyncio.wait_for(until.wait(), timeout=8)
            except TimeoutError:
                continue
    except asyncio.CancelledError:
        pass
