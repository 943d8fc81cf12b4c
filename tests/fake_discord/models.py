"""The fake's state model: users, roles, members, channels, guilds, messages, attachments,
webhooks, and the records tests inspect (recorded REST requests, injected failures,
interaction handles).

Plain dataclasses; each knows how to render itself as Discord's JSON payload.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.fake_discord.common import (
    PATIENCE,
    THREAD_TYPES,
    ChannelType,
    MessageFlag,
    _iso,
    _not_found,
    _now,
    _opt_str,
    snowflake_time,
)

if TYPE_CHECKING:
    from tests.fake_discord.core import FakeDiscord


@dataclass
class FakeUser:
    id: int
    username: str
    bot: bool = False
    global_name: str | None = None
    avatar: str | None = None
    accepts_dms: bool = True

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def to_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "username": self.username, "discriminator": "0",
            "global_name": self.global_name, "avatar": self.avatar, "bot": self.bot,
            "public_flags": 0, "flags": 0, "banner": None, "accent_color": None,
            "avatar_decoration_data": None, "primary_guild": None,
        }  # fmt: skip


@dataclass
class FakeRole:
    id: int
    guild_id: int
    name: str
    permissions: int = 0
    position: int = 0
    color: int = 0
    hoist: bool = False
    mentionable: bool = False
    managed: bool = False
    bot_id: int | None = None

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def to_payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "name": self.name, "color": self.color,
            "colors": {"primary_color": self.color, "secondary_color": None, "tertiary_color": None},
            "hoist": self.hoist, "icon": None, "unicode_emoji": None, "position": self.position,
            "permissions": str(self.permissions), "managed": self.managed,
            "mentionable": self.mentionable, "flags": 0,
        }  # fmt: skip
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass
class FakeMember:
    user: FakeUser
    guild_id: int
    roles: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: datetime = field(default_factory=_now)

    @property
    def id(self) -> int:
        return self.user.id

    def to_payload(self, *, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nick": self.nick, "avatar": None, "banner": None, "roles": [str(r) for r in self.roles],
            "joined_at": _iso(self.joined_at), "premium_since": None, "deaf": False, "mute": False,
            "flags": 0, "pending": False, "communication_disabled_until": None,
        }  # fmt: skip
        if with_user:
            data["user"] = self.user.to_payload()
        return data


@dataclass
class FakeChannel:
    id: int
    type: int
    guild_id: int | None = None
    name: str | None = None
    parent_id: int | None = None
    position: int = 0
    topic: str | None = None
    nsfw: bool = False
    permission_overwrites: list[dict[str, Any]] = field(default_factory=list)
    recipients: list[FakeUser] = field(default_factory=list)
    owner_id: int | None = None
    archived: bool = False
    locked: bool = False
    last_message_id: int | None = None

    @property
    def is_thread(self) -> bool:
        return self.type in THREAD_TYPES

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def to_payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "type": self.type, "flags": 0,
            "last_message_id": _opt_str(self.last_message_id),
        }  # fmt: skip
        if self.type == ChannelType.DM:
            data["recipients"] = [u.to_payload() for u in self.recipients]
            return data
        data.update(
            guild_id=_opt_str(self.guild_id), name=self.name, parent_id=_opt_str(self.parent_id),
            nsfw=self.nsfw, rate_limit_per_user=0,
        )  # fmt: skip
        if self.is_thread:
            created = _iso(snowflake_time(self.id))
            data.update(
                owner_id=_opt_str(self.owner_id), message_count=0, member_count=1,
                total_message_sent=0,
                thread_metadata={
                    "archived": self.archived, "auto_archive_duration": 1440,
                    "archive_timestamp": created, "locked": self.locked, "invitable": True,
                    "create_timestamp": created,
                },
            )  # fmt: skip
            return data
        data.update(
            position=self.position, topic=self.topic,
            permission_overwrites=copy.deepcopy(self.permission_overwrites),
        )  # fmt: skip
        if self.type in (ChannelType.GUILD_VOICE, 13):
            data.update(bitrate=64000, user_limit=0, rtc_region=None)
        if self.type in (ChannelType.GUILD_FORUM, 16):
            data.update(available_tags=[], default_reaction_emoji=None)
        return data


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: dict[int, FakeRole] = field(default_factory=dict)
    members: dict[int, FakeMember] = field(default_factory=dict)
    channel_ids: list[int] = field(default_factory=list)
    joined_at: datetime = field(default_factory=_now)

    @property
    def everyone(self) -> FakeRole:
        return self.roles[self.id]


@dataclass
class FakeFile:
    """A file a test user attaches, or one the bot uploaded (multipart ``files[n]``)."""

    filename: str
    data: bytes
    content_type: str | None = None
    description: str | None = None

    @classmethod
    def text(
        cls, filename: str, text: str, content_type: str = "text/plain; charset=utf-8"
    ) -> FakeFile:
        """A text file encoded as UTF-8, e.g. the ``message.txt`` Discord makes of a long
        paste (``FakeFile.text("message.txt", long_text)``) or shared code
        (``FakeFile.text("bot.py", src, "text/x-python; charset=utf-8")``)."""
        return cls(filename, text.encode(), content_type)


@dataclass
class FakeAttachment:
    id: int
    filename: str
    data: bytes
    url: str
    content_type: str | None = None
    description: str | None = None
    ephemeral: bool = False
    #: the media-proxy address (``Attachment.proxy_url``); served like ``url``.
    proxy_url: str = ""

    def to_payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "filename": self.filename, "size": len(self.data),
            "url": self.url, "proxy_url": self.proxy_url or self.url,
            "content_type": self.content_type,
            "description": self.description, "height": None, "width": None, "flags": 0,
        }  # fmt: skip
        if self.ephemeral:
            data["ephemeral"] = True
        return data


@dataclass
class FakeWebhook:
    id: int
    token: str
    channel_id: int
    guild_id: int | None
    name: str
    creator: FakeUser
    avatar: str | None = None
    application_id: int | None = None

    @property
    def url(self) -> str:
        """Discord's webhook URL form; ``discord.Webhook.from_url`` accepts it."""
        return f"https://discord.com/api/webhooks/{self.id}/{self.token}"

    def to_payload(self, *, with_token: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "type": 1, "guild_id": _opt_str(self.guild_id),
            "channel_id": str(self.channel_id), "name": self.name, "avatar": self.avatar,
            "application_id": _opt_str(self.application_id), "user": self.creator.to_payload(),
        }  # fmt: skip
        if with_token:
            data["token"] = self.token
        return data


@dataclass
class FakeMessage:
    """A message as the fake stores it: current state plus history useful to assertions."""

    id: int
    channel_id: int
    guild_id: int | None
    author: FakeUser
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    flags: int = 0
    tts: bool = False
    type: int = 0
    nonce: str | int | None = None
    webhook_id: int | None = None
    application_id: int | None = None
    #: ``username`` / ``avatar_url`` a webhook execution used (None for normal messages).
    username: str | None = None
    avatar_url: str | None = None
    #: the ``allowed_mentions`` the last create/edit sent (None = field absent).
    allowed_mentions: dict[str, Any] | None = None
    mentions: list[int] = field(default_factory=list)
    mention_roles: list[int] = field(default_factory=list)
    mention_everyone: bool = False
    reference_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    edited_at: datetime | None = None
    #: previous contents, oldest first (one entry per edit that changed the content).
    history: list[str] = field(default_factory=list)
    deleted: bool = False
    reactions: dict[str, set[int]] = field(default_factory=dict)
    #: connected gateway sessions its MESSAGE_CREATE was written to when it was posted: 0
    #: while no bot was connected (a session awaiting a RESUME only buffers it).
    delivered: int = 0

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MessageFlag.EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & MessageFlag.LOADING)

    @property
    def created_at(self) -> datetime:
        return snowflake_time(self.id)


@dataclass
class RecordedRequest:
    """One REST call as the fake saw it (also the ones answered by an injected failure)."""

    method: str
    path: str  # relative to /api/v10, without the query string
    query: dict[str, str]
    json: Any
    files: list[FakeFile]
    headers: dict[str, str]
    status: int = 0
    injected: bool = False

    @property
    def allowed_mentions(self) -> dict[str, Any] | None:
        return self.json.get("allowed_mentions") if isinstance(self.json, dict) else None


@dataclass
class Injection:
    """A failure armed by :meth:`FakeDiscord.inject`; ``hits`` counts how often it fired."""

    method: str
    pattern: re.Pattern[str]
    status: int
    retry_after: float
    remaining: int
    global_: bool
    body: dict[str, Any] | None
    hits: int = 0
    #: matching calls still to let through before failing (``inject(..., after=n)``).
    skip: int = 0
    #: "reset" (TCP RST) or "close" (FIN) instead of an answer; None answers ``status``.
    drop: str | None = None


@dataclass
class RequestHook:
    """An action armed by :meth:`FakeDiscord.on_request`: runs before the route handles the
    next ``remaining`` matching calls (after ``skip`` more pass untouched)."""

    method: str
    pattern: re.Pattern[str]
    action: Callable[[RecordedRequest], Any]
    remaining: int
    skip: int = 0
    hits: int = 0


@dataclass
class InteractionResponse:
    """The initial callback (``POST /interactions/{id}/{token}/callback``) a bot made."""

    type: int
    data: dict[str, Any]
    files: list[FakeFile] = field(default_factory=list)

    @property
    def content(self) -> str | None:
        return self.data.get("content")

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MessageFlag.EPHEMERAL)

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return self.data.get("embeds") or []

    @property
    def components(self) -> list[dict[str, Any]]:
        return self.data.get("components") or []

    @property
    def choices(self) -> list[dict[str, Any]]:
        return self.data.get("choices") or []


class InteractionHandle:
    """What a test holds after it fired an interaction: the bot's responses to it."""

    def __init__(
        self,
        fake: FakeDiscord,
        *,
        id: int,
        token: str,
        type: int,
        payload: dict[str, Any],
        channel_id: int,
        guild_id: int | None,
        user: FakeUser,
        deadline: float,
        command_name: str | None = None,
        component_message: FakeMessage | None = None,
    ) -> None:
        self._fake = fake
        self.id = id
        self.token = token
        self.type = type
        self.payload = payload
        self.channel_id = channel_id
        self.guild_id = guild_id
        self.user = user
        self.deadline = deadline
        self.command_name = command_name
        #: the message a component/modal interaction came from (target of type 6/7 updates).
        self.component_message = component_message
        self.response: InteractionResponse | None = None
        #: the ``@original`` message (None until a type 4/5/6/7 callback).
        self.original: FakeMessage | None = None
        self.followups: list[FakeMessage] = []
        #: set when the bot tried to answer after ``respond_within`` elapsed.
        self.expired = False

    @property
    def messages(self) -> list[FakeMessage]:
        return ([self.original] if self.original else []) + self.followups

    async def wait_response(self, timeout: float = PATIENCE) -> InteractionResponse:
        """Wait for the initial callback (any type)."""
        await self._fake.wait_for(
            lambda: self.response is not None,
            timeout,
            message=f"a response to interaction {self.id}",
        )
        assert self.response is not None
        return self.response

    async def wait_message(
        self, timeout: float = PATIENCE, predicate: Callable[[FakeMessage], bool] | None = None
    ) -> FakeMessage:
        """Wait until ``@original`` exists and is no longer a deferred "thinking" message."""

        def ready() -> FakeMessage | None:
            msg = self.original
            if msg is None or msg.loading:
                return None
            return msg if predicate is None or predicate(msg) else None

        return await self._fake.wait_for(ready, timeout, message=f"@original of {self.id}")

    async def wait_followups(self, count: int = 1, timeout: float = PATIENCE) -> list[FakeMessage]:
        await self._fake.wait_for(
            lambda: len(self.followups) >= count, timeout, message=f"{count} follow-up(s)"
        )
        return list(self.followups)


@dataclass
class _Call:
    """A parsed REST request as handlers see it."""

    request: web.Request
    params: Mapping[str, str]
    query: Mapping[str, str]
    json: Any
    files: list[FakeFile]

    def id(self, name: str, what: str = "Channel", code: int = 10003) -> int:
        try:
            return int(self.params[name])
        except (KeyError, ValueError):
            raise _not_found(what, code) from None

    @property
    def body(self) -> dict[str, Any]:
        return self.json if isinstance(self.json, dict) else {}


UserLike = FakeUser | FakeMember | int
