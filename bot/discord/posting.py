"""Putting a reply into Discord: streaming edits, the 2000-character split, code fences, pings.

Part of the Discord layer (`bot/discord/`, the only part of `bot/` that imports discord.py):
everything the bot posts goes through a `ReplyStream`, so no path can forget `AllowedMentions` or
the length limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import aiohttp
import discord

log = logging.getLogger(__name__)

LIMIT = 2000
#: Nobody is pinged by anything the bot posts: not everyone/here, not roles, not users, and the
#: author of the message it replies to neither.
NO_PINGS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=False)

#: Seconds a send or edit keeps being retried when the caller gives no deadline (notices).
RETRY_BUDGET = 20.0
#: First wait before retrying a failed send or edit; doubled each time, up to RETRY_MAX_WAIT.
RETRY_FIRST_WAIT = 0.25
RETRY_MAX_WAIT = 8.0

T = TypeVar("T")

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


def retryable(exc: BaseException) -> bool:
    """A failure worth trying again: Discord's 5xx (discord.py retries 500/502/504/524 itself
    but not 503, and gives up on the others after a few tries) or a connection dropped or reset
    on the way (discord.py retries ECONNRESET only on Windows and macOS)."""
    return isinstance(exc, discord.DiscordServerError | aiohttp.ClientConnectionError)


async def retrying(what: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """`await call()`, again after a growing wait while it fails with a `retryable` error and
    the next try would still start before `deadline` (a `time.monotonic()` value).

    A send is only repeated when it failed as a whole: a bot-account send carries a nonce that
    Discord enforces, so a retried send that did arrive is not posted twice.
    """
    wait = RETRY_FIRST_WAIT
    while True:
        try:
            return await call()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + wait >= deadline:
                raise
            log.warning("%s failed (%s); retrying in %.2fs", what, describe_failure(exc), wait)
        await asyncio.sleep(wait)
        wait = min(wait * 2, RETRY_MAX_WAIT)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed Discord call (for the log: no traceback for what Discord says)."""
    if isinstance(exc, discord.HTTPException):
        return f"HTTP {exc.status}" + (f" {exc.text}" if exc.text else "")
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Uneditable(Exception):
    """A reply message could not be edited (its cause says why)."""


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True)
class Identity:
    """Who the reply is posted as: the bot itself, or a persona through a webhook."""

    webhook: discord.Webhook | None = None
    username: str | None = None
    avatar_url: str | None = None
    prefix: str = ""  # e.g. "**Aria:** " when a persona must speak through the bot's own account
    thread: discord.abc.Snowflake | None = None


class Target(Protocol):
    """Where a generated reply is shown: `ReplyStream` (new messages), or a swiped message."""

    messages: list[discord.Message]
    text: str

    async def update(self, text: str) -> None: ...
    async def finish(self, text: str) -> list[discord.Message]: ...


@runtime_checkable
class Alternative(Target, Protocol):
    """A target that shows a swipe's alternative: `fit` is the text it will show (stored
    before it is shown)."""

    def fit(self, text: str) -> str: ...


@dataclass
class ReplyStream:
    """Streams a growing reply into one or more messages, editing at most every `interval` s.

    Sends and edits that fail with a `retryable` error are tried again until `deadline` (a
    `time.monotonic()` value; RETRY_BUDGET from creation when not given). A message that still
    cannot be edited keeps what it shows, and the rest of the reply continues in new messages,
    so the messages together always read as the whole reply. A reply to a message deleted in
    the meantime is posted without the reference (Discord's `fail_if_not_exists=False`).
    `final_view` (the swipe buttons) goes out with the final send or edit when the reply ends
    as one message, never in an edit of its own; `view_shown` says whether it did. `live_view`
    (the ⏹ button) rides on the growing message while the reply streams, moves to the next
    message when the reply splits, and is gone with the final text (or `clear_live`).
    """

    channel: discord.abc.Messageable
    reference: discord.Message | discord.PartialMessage | None = None
    identity: Identity = field(default_factory=Identity)
    interval: float = 1.2
    messages: list[discord.Message] = field(default_factory=list)
    #: Called once when the webhook turns out to be deleted before the first message: returns
    #: the identity to use instead (a fresh webhook, or the bot's own account).
    recover: Callable[[], Awaitable[Identity]] | None = None
    deadline: float | None = None
    #: Buttons for the final message of a one-message reply (see `view_shown`).
    final_view: discord.ui.View | None = None
    #: Whether `final_view` went out with the final text.
    view_shown: bool = False
    #: Buttons on the growing message while the reply streams (see the class docstring).
    live_view: discord.ui.View | None = None
    #: The reply text (without the identity prefix) the messages show now.
    text: str = ""
    _shown: list[str] = field(default_factory=list)
    _last_edit: float = 0.0
    #: Messages before this index can no longer be edited; `_base` is where, in the prefixed
    #: text, the editable ones start.
    _live_from: int = 0
    _base: int = 0
    _full: str = ""
    #: An edit failed for good: no more streaming edits, the rest comes with `finish`.
    _hold: bool = False
    #: Indexes of the messages showing `live_view` now.
    _with_live: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + RETRY_BUDGET

    async def _send(self, content: str, view: discord.ui.View | None = None) -> discord.Message:
        nonce = random.randrange(1, 1 << 62)  # the same for every retry of this message
        try:
            return await self._retry("send", lambda: self._send_as(content, nonce, view))
        except discord.NotFound:
            if self.identity.webhook is None or self.recover is None or self.messages:
                raise
            recover, self.recover = self.recover, None
            self.identity = await recover()
            return await self._retry("send", lambda: self._send_as(content, nonce, view))

    def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        assert self.deadline is not None
        return retrying(what, call, self.deadline)

    async def _send_as(
        self, content: str, nonce: int, view: discord.ui.View | None
    ) -> discord.Message:
        ident = self.identity
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        if ident.webhook is not None:
            kwargs: dict[str, Any] = {
                "username": ident.username,
                "wait": True,
                "allowed_mentions": NO_PINGS,
                **extra,
            }
            if ident.avatar_url:
                kwargs["avatar_url"] = ident.avatar_url
            if ident.thread is not None:
                kwargs["thread"] = ident.thread
            return await ident.webhook.send(content, **kwargs)
        if self.reference is not None and not self.messages:
            return await self.channel.send(
                content,
                reference=self.reference.to_reference(fail_if_not_exists=False),
                mention_author=False,
                allowed_mentions=NO_PINGS,
                nonce=nonce,
                **extra,
            )
        return await self.channel.send(content, allowed_mentions=NO_PINGS, nonce=nonce, **extra)

    async def _edit(
        self, message: discord.Message, content: str, view: Any = discord.utils.MISSING
    ) -> None:
        """Edit `message` to `content`; `view`: its new buttons (None removes them), left as
        they are when not given."""
        ident = self.identity
        kwargs: dict[str, Any] = {"content": content, "allowed_mentions": NO_PINGS}
        if view is not discord.utils.MISSING:
            kwargs["view"] = view
        if ident.webhook is not None:
            if ident.thread is not None:
                kwargs["thread"] = ident.thread
            webhook = ident.webhook
            await self._retry("edit", lambda: webhook.edit_message(message.id, **kwargs))
        else:
            await self._retry("edit", lambda: message.edit(**kwargs))

    def _chunks(self, full: str) -> list[str]:
        rest = full[self._base :]
        return split_message(rest) if rest.strip() else []

    async def update(self, text: str) -> None:
        """Show the reply so far, unless the last edit was less than `interval` ago."""
        if self._hold or (time.monotonic() - self._last_edit < self.interval and self.messages):
            return
        await self._render(text, final=False)

    async def finish(self, text: str) -> list[discord.Message]:
        """Show the final text exactly; returns every message that holds it."""
        await self._render(text, final=True)
        return self.messages

    async def _render(self, text: str, *, final: bool) -> None:
        full = self.identity.prefix + text
        while True:
            try:
                await self._render_live(full, final=final)
                break
            except _Uneditable as exc:
                # The message cannot be edited any more: it keeps what it shows, and the rest
                # goes into new messages.
                log.warning(
                    "could not edit reply message (%s); continuing in a new message",
                    describe_failure(exc.__cause__ or exc),
                )
                self._base = _common_prefix(self._full, full)
                self._live_from = len(self.messages)
                self._hold = True
                if not final:
                    return
        self._full = full
        self.text = text
        self._last_edit = time.monotonic()

    async def _render_live(self, full: str, *, final: bool) -> None:
        chunks = self._chunks(full)
        if not final:
            # While streaming, only the last chunk grows; earlier ones are settled when a new
            # chunk starts.
            chunks = [c for c in chunks if c.strip()]
            if not chunks:
                return
        live = self._live_from
        # the buttons ride on the final text of a reply that is one message
        view = self.final_view if final and live == 0 and len(chunks) == 1 else None
        for i, chunk in enumerate(chunks):
            at = live + i
            # while streaming, the growing (last) message carries the live buttons
            want = view if final else self.live_view if i == len(chunks) - 1 else None
            if at < len(self.messages):
                had = at in self._with_live
                swap = want is not None and (final or not had)  # final buttons always go out
                drop = want is None and had
                if self._shown[at] != chunk or swap or drop:
                    try:
                        await self._edit(
                            self.messages[at], chunk, want if swap or drop else discord.utils.MISSING
                        )
                    except (discord.HTTPException, aiohttp.ClientError) as exc:
                        raise _Uneditable from exc
                    self._shown[at] = chunk
            else:
                self.messages.append(await self._send(chunk, want))
                self._shown.append(chunk)
            if want is not None and not final:
                self._with_live.add(at)
            else:
                self._with_live.discard(at)
        self.view_shown = view is not None
        if final:
            keep = live + len(chunks)
            for message in self.messages[keep:]:  # the final text got shorter
                try:
                    if self.identity.webhook is not None:
                        await self.identity.webhook.delete_message(message.id)
                    else:
                        await message.delete()
                except discord.HTTPException:
                    log.warning("could not delete surplus reply message %s", message.id)
            del self.messages[keep:], self._shown[keep:]
            self._with_live = {at for at in self._with_live if at < keep}

    async def clear_live(self) -> None:
        """Take `live_view` off the messages showing it (a reply that ended without `finish`:
        a failure or timeout); what cannot be edited keeps it."""
        for at in sorted(self._with_live):
            try:
                await self._edit(self.messages[at], self._shown[at], None)
            except (discord.HTTPException, aiohttp.ClientError) as exc:
                log.warning("could not take the buttons off a reply: %s", describe_failure(exc))
        self._with_live.clear()


async def post(
    channel: discord.abc.Messageable,
    text: str,
    *,
    reference: discord.Message | discord.PartialMessage | None = None,
    identity: Identity | None = None,
    deadline: float | None = None,
) -> list[discord.Message]:
    """Post a complete text (notices, greetings) with the same splitting, ping and retry rules."""
    stream = ReplyStream(channel, reference, identity or Identity(), interval=0, deadline=deadline)
    return await stream.finish(text)


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
