"""A protocol-level fake of Discord's gateway and REST API, for tests.

Why: the bot's tests must exercise the *real*, unmodified discord.py client (its gateway
state machine, rate-limit handling, interaction plumbing, webhook adapter) rather than
mocks of it.  So this module runs an aiohttp server on 127.0.0.1 that speaks Discord's wire
protocol well enough for discord.py to log in, receive events and call the REST API, while
keeping a small model of Discord's state (users, guilds, channels, roles, members, messages,
webhooks, application commands, interactions) that tests can drive and inspect.

Only two class attributes of discord.py are redirected (and restored) by
:func:`running_fake`: ``discord.http.Route.BASE`` (every REST and webhook call is built from
it) and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``.  The latter is needed because a
plain ``discord.Client`` never asks ``GET /gateway/bot``; it always opens its first
connection to that constant and afterwards uses READY's ``resume_gateway_url``.

Typical use::

    async with running_fake(heartbeat_interval=500) as fake:
        guild = fake.add_guild("Test Guild")
        general = fake.add_channel(guild.id, "general")
        alice = fake.add_member(guild.id, "alice").user
        client = discord.Client(intents=discord.Intents.all(), guild_ready_timeout=0.05)
        async with connected_client(client, fake):
            await fake.user_message(general.id, alice, "hello")
            await fake.wait_for(lambda: fake.last_message(general.id).author.bot)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import math
import re
import secrets
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import discord
import yarl
from aiohttp import WSMsgType, web
from discord.gateway import DiscordWebSocket
from discord.http import Route

log = logging.getLogger(__name__)

API_PREFIX = "/api/v10"
DISCORD_EPOCH = 1420070400000
MAX_CONTENT_LENGTH = 2000
MAX_EMBED_DESCRIPTION = 4096
DEFAULT_TOKEN = "fake-bot-token"


class Intent:
    """Gateway intent bits the fake uses to decide which sessions receive which events."""

    GUILDS = 1 << 0
    GUILD_MEMBERS = 1 << 1
    GUILD_WEBHOOKS = 1 << 5
    GUILD_PRESENCES = 1 << 8
    GUILD_MESSAGES = 1 << 9
    GUILD_MESSAGE_REACTIONS = 1 << 10
    GUILD_MESSAGE_TYPING = 1 << 11
    DIRECT_MESSAGES = 1 << 12
    DIRECT_MESSAGE_REACTIONS = 1 << 13
    DIRECT_MESSAGE_TYPING = 1 << 14
    MESSAGE_CONTENT = 1 << 15
    PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT


class MessageFlag:
    SUPPRESS_EMBEDS = 1 << 2
    EPHEMERAL = 1 << 6
    LOADING = 1 << 7


class ChannelType:
    GUILD_TEXT = 0
    DM = 1
    GUILD_VOICE = 2
    GUILD_CATEGORY = 4
    GUILD_NEWS = 5
    NEWS_THREAD = 10
    PUBLIC_THREAD = 11
    PRIVATE_THREAD = 12
    GUILD_FORUM = 15


THREAD_TYPES = frozenset({10, 11, 12})

PermissionLike = int | discord.Permissions | str | Iterable[str]


def permission_value(value: PermissionLike) -> int:
    """Accept an int bitfield, a ``discord.Permissions`` or permission names ("manage_webhooks")."""
    if isinstance(value, discord.Permissions):
        return value.value
    if isinstance(value, int):
        return value
    names = [value] if isinstance(value, str) else list(value)
    return discord.Permissions(**dict.fromkeys(names, True)).value


ALL_PERMISSIONS = discord.Permissions.all().value
ADMINISTRATOR = permission_value("administrator")
VIEW_CHANNEL = permission_value("view_channel")
MENTION_EVERYONE = permission_value("mention_everyone")
MANAGE_WEBHOOKS = permission_value("manage_webhooks")
DEFAULT_EVERYONE_PERMISSIONS = permission_value(
    [
        "view_channel", "send_messages", "send_messages_in_threads", "create_public_threads",
        "embed_links", "attach_files", "read_message_history", "add_reactions",
        "use_application_commands", "use_external_emojis", "change_nickname", "connect", "speak",
    ]
)  # fmt: skip
DEFAULT_BOT_PERMISSIONS = DEFAULT_EVERYONE_PERMISSIONS | permission_value(
    ["manage_webhooks", "manage_messages", "manage_threads"]
)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


class _Snowflakes:
    """Time-based, strictly increasing ids, so ``before``/``after`` history paging is ordered."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH) << 22
        self._last = max(self._last + 1, now)
        return self._last


def snowflake_time(snowflake: int) -> datetime:
    return datetime.fromtimestamp(((snowflake >> 22) + DISCORD_EPOCH) / 1000, UTC)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat()


def _now() -> datetime:
    return datetime.now(UTC)


def _opt_str(value: int | None) -> str | None:
    return None if value is None else str(value)


def _bool_query(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class ApiError(Exception):
    """Raised by REST handlers; turned into Discord's JSON error shape by the middleware."""

    def __init__(
        self, status: int, message: str, code: int = 0, errors: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {message} (code {code})")
        self.status = status
        self.body: dict[str, Any] = {"message": message, "code": code}
        if errors is not None:
            self.body["errors"] = errors


def _field_error(code: str, message: str) -> dict[str, Any]:
    return {"_errors": [{"code": code, "message": message}]}


def _max_len(limit: int) -> dict[str, Any]:
    return _field_error("BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


def _bad_len(low: int, high: int) -> dict[str, Any]:
    return _field_error("BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length.")


def _form_error(errors: dict[str, Any]) -> ApiError:
    return ApiError(400, "Invalid Form Body", 50035, errors)


def _not_found(what: str, code: int) -> ApiError:
    return ApiError(404, f"Unknown {what}", code)


MISSING_PERMISSIONS = (403, "Missing Permissions", 50013)


# --------------------------------------------------------------------------------------------
# the state model
# --------------------------------------------------------------------------------------------


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


@dataclass
class FakeAttachment:
    id: int
    filename: str
    data: bytes
    url: str
    content_type: str | None = None
    description: str | None = None
    ephemeral: bool = False

    def to_payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id), "filename": self.filename, "size": len(self.data),
            "url": self.url, "proxy_url": self.url, "content_type": self.content_type,
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

    async def wait_response(self, timeout: float = 5.0) -> InteractionResponse:
        """Wait for the initial callback (any type)."""
        await self._fake.wait_for(
            lambda: self.response is not None,
            timeout,
            message=f"a response to interaction {self.id}",
        )
        assert self.response is not None
        return self.response

    async def wait_message(
        self, timeout: float = 5.0, predicate: Callable[[FakeMessage], bool] | None = None
    ) -> FakeMessage:
        """Wait until ``@original`` exists and is no longer a deferred "thinking" message."""

        def ready() -> FakeMessage | None:
            msg = self.original
            if msg is None or msg.loading:
                return None
            return msg if predicate is None or predicate(msg) else None

        return await self._fake.wait_for(ready, timeout, message=f"@original of {self.id}")

    async def wait_followups(self, count: int = 1, timeout: float = 5.0) -> list[FakeMessage]:
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


# --------------------------------------------------------------------------------------------
# gateway connections and sessions
# --------------------------------------------------------------------------------------------


class _Close:
    def __init__(self, code: int) -> None:
        self.code = code


_STOP = object()


def _zstd_compressor() -> Callable[[bytes], bytes]:
    """Streaming zstd with one block flush per message (what zstd-stream clients expect)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+

        comp = zstd.ZstdCompressor()
        return lambda data: comp.compress(data, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
    except ImportError:
        import zstandard  # type: ignore[import-not-found]

        cobj = zstandard.ZstdCompressor().compressobj()
        return lambda data: cobj.compress(data) + cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class _GatewayConnection:
    """One websocket.  All frames go through a single writer task so the shared compression
    stream sees payloads in exactly the order they hit the wire."""

    def __init__(self, ws: web.WebSocketResponse, compress: str | None, path: str) -> None:
        self.ws = ws
        self.path = path
        self.compress = compress
        self.session: _Session | None = None
        self.server_closed = False
        self.heartbeats = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._encode: Callable[[bytes], bytes] | None = None
        if compress == "zlib-stream":
            zobj = zlib.compressobj()
            self._encode = lambda data: zobj.compress(data) + zobj.flush(zlib.Z_SYNC_FLUSH)
        elif compress == "zstd-stream":
            self._encode = _zstd_compressor()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def send(self, payload: dict[str, Any]) -> None:
        self.queue.put_nowait(payload)

    def close(self, code: int) -> None:
        self.server_closed = True
        self.queue.put_nowait(_Close(code))

    async def drain(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.queue.join(), timeout)

    async def stop(self) -> None:
        self.queue.put_nowait(_STOP)
        await self._writer
        while not self.queue.empty():  # nothing more can be written; unblock drain()
            self.queue.get_nowait()
            self.queue.task_done()

    async def _write_loop(self) -> None:
        while True:
            item = await self.queue.get()
            try:
                if item is _STOP:
                    return
                if self.ws.closed:
                    continue
                if isinstance(item, _Close):
                    await self.ws.close(code=item.code)
                    continue
                raw = json.dumps(item, separators=(",", ":")).encode()
                if self._encode is None:
                    await self.ws.send_str(raw.decode())
                else:
                    await self.ws.send_bytes(self._encode(raw))
            except Exception:  # the peer went away mid-write; the session buffer keeps it
                log.debug("gateway write failed", exc_info=True)
            finally:
                self.queue.task_done()


@dataclass
class _Session:
    id: str
    intents: int
    shard: list[int] | None = None
    seq: int = 0
    buffer: list[dict[str, Any]] = field(default_factory=list)
    connection: _GatewayConnection | None = None
    invalid: bool = False


# --------------------------------------------------------------------------------------------
# the fake
# --------------------------------------------------------------------------------------------

_MENTION_USER = re.compile(r"<@!?(\d+)>")
_MENTION_ROLE = re.compile(r"<@&(\d+)>")
_PLACEHOLDER = re.compile(r"\{[A-Za-z_]\w*\}")
_OPTION_TYPES = {1: "SUB_COMMAND", 2: "SUB_COMMAND_GROUP", 3: "STRING", 4: "INTEGER", 5: "BOOLEAN",
                 6: "USER", 7: "CHANNEL", 8: "ROLE", 9: "MENTIONABLE", 10: "NUMBER", 11: "ATTACHMENT"}  # fmt: skip
_ALLOWED_CALLBACKS = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}

UserLike = FakeUser | FakeMember | int
# where the middleware leaves the parsed body for the route handler
_CALL_KEY: Any = web.RequestKey("fake_call", tuple) if hasattr(web, "RequestKey") else "fake_call"


class FakeDiscord:
    """Discord, as far as one bot can tell.  Start with :func:`running_fake`."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_name: str = "HermesBot",
        heartbeat_interval: int = 41250,
        privileged_intents: int = Intent.PRIVILEGED,
        ack_heartbeats: bool = True,
    ) -> None:
        """``heartbeat_interval`` is in milliseconds, as in HELLO.  ``privileged_intents`` are
        the ones "enabled in the developer portal": identifying with others closes with 4014."""
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.privileged_intents = privileged_intents
        self.ack_heartbeats = ack_heartbeats
        self.snowflake = _Snowflakes()

        self.users: dict[int, FakeUser] = {}
        self.bot_user = self.add_user(bot_name, bot=True)
        self.application_id = self.bot_user.id  # like real bots: app id == bot user id
        self.application_flags = 0
        self.owner = self.add_user("app-owner")
        self.guilds: dict[int, FakeGuild] = {}
        self.channels: dict[int, FakeChannel] = {}
        self.webhooks: dict[int, FakeWebhook] = {}
        self.messages: dict[int, FakeMessage] = {}  # every message by id, ephemeral ones too
        self._channel_messages: dict[int, list[int]] = {}
        self._dm_by_user: dict[int, int] = {}
        self._attachments: dict[int, FakeAttachment] = {}
        self._commands: dict[int | None, list[dict[str, Any]]] = {}
        self._interactions: dict[int, InteractionHandle] = {}

        #: every REST call, in arrival order.
        self.requests: list[RecordedRequest] = []
        #: REST calls that matched no route (a gap in the fake or a bug in the caller).
        self.unknown_routes: list[RecordedRequest] = []
        #: POST /channels/{id}/typing counts per channel id.
        self.typing: Counter[int] = Counter()
        #: every dispatched (event name, data) once, whatever the number of sessions.
        self.dispatched: list[tuple[str, dict[str, Any]]] = []
        self.injections: list[Injection] = []
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeat_count = 0
        #: (path, query) of each gateway websocket opened.
        self.gateway_connections: list[tuple[str, dict[str, str]]] = []

        self._sessions: dict[str, _Session] = {}
        self._connections: set[_GatewayConnection] = set()
        self._waiters: set[asyncio.Future[None]] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._api_middleware], client_max_size=100 * 2**20)
        app.router.add_get("/gateway", self._gateway_handler)
        app.router.add_get("/gateway-resume", self._gateway_handler)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._download)
        for method, path, handler in self._routes():
            app.router.add_route(method, API_PREFIX + path, self._wrap(handler))
        # a short shutdown: a websocket left open by a test must not stall cleanup for 60 s
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        for conn in list(self._connections):
            conn.close(1001)
            await conn.drain(1.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- waiting --------------------------------------------------------------------------

    def _notify(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 5.0, *, message: str | None = None
    ) -> Any:
        """Return ``predicate()``'s first truthy value, re-checking on every change the fake
        sees (and every 20 ms, for conditions about the bot's own state)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = ", ".join(f"{r.method} {r.path}->{r.status}" for r in self.requests[-5:])
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {message or predicate!r}; "
                    f"last requests: [{recent}]"
                )
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.add(fut)
            try:
                await asyncio.wait({fut}, timeout=min(remaining, 0.02))
            finally:
                self._waiters.discard(fut)
                fut.cancel()

    async def wait_connected(self, timeout: float = 5.0) -> None:
        """Wait until some session has a live, identified (or resumed) websocket."""
        await self.wait_for(
            lambda: any(s.connection and not s.invalid for s in self._sessions.values()),
            timeout,
            message="a connected gateway session",
        )

    # ---- world building (sync; dispatches to connected sessions) ---------------------------

    def add_user(
        self,
        username: str,
        *,
        bot: bool = False,
        global_name: str | None = None,
        id: int | None = None,
    ) -> FakeUser:
        user = FakeUser(
            id=id or self.snowflake(), username=username, bot=bot, global_name=global_name
        )
        self.users[user.id] = user
        return user

    def add_guild(
        self,
        name: str = "Test Guild",
        *,
        owner: FakeUser | None = None,
        everyone_permissions: PermissionLike = DEFAULT_EVERYONE_PERMISSIONS,
        bot_permissions: PermissionLike = DEFAULT_BOT_PERMISSIONS,
        id: int | None = None,
    ) -> FakeGuild:
        """A guild the bot is in: @everyone role, a managed bot role, the owner and the bot as
        members.  Added while connected, it arrives as GUILD_CREATE (the bot "joined")."""
        owner = owner or self.add_user(f"{name}-owner")
        guild = FakeGuild(id=id or self.snowflake(), name=name, owner_id=owner.id)
        self.guilds[guild.id] = guild
        guild.roles[guild.id] = FakeRole(
            guild.id, guild.id, "@everyone", permission_value(everyone_permissions)
        )
        bot_role = FakeRole(
            self.snowflake(), guild.id, self.bot_user.username, permission_value(bot_permissions),
            position=1, managed=True, bot_id=self.bot_user.id,
        )  # fmt: skip
        guild.roles[bot_role.id] = bot_role
        guild.members[owner.id] = FakeMember(owner, guild.id)
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, guild.id, [bot_role.id])
        self._dispatch("GUILD_CREATE", self._guild_payload(guild), Intent.GUILDS)
        return guild

    def bot_role(self, guild_id: int) -> FakeRole:
        return next(r for r in self.guilds[guild_id].roles.values() if r.bot_id == self.bot_user.id)

    def add_channel(
        self,
        guild_id: int,
        name: str,
        type: int = ChannelType.GUILD_TEXT,
        *,
        parent_id: int | None = None,
        permission_overwrites: Sequence[dict[str, Any]] = (),
        topic: str | None = None,
        nsfw: bool = False,
        owner: UserLike | None = None,
    ) -> FakeChannel:
        """A guild channel; thread types (10/11/12) need ``parent_id`` and go in ``threads``."""
        guild = self.guilds[guild_id]
        if type in THREAD_TYPES and parent_id is None:
            raise ValueError("a thread needs parent_id")
        channel = FakeChannel(
            id=self.snowflake(), type=type, guild_id=guild_id, name=name, parent_id=parent_id,
            position=len(guild.channel_ids), topic=topic, nsfw=nsfw,
            permission_overwrites=[dict(o) for o in permission_overwrites],
            owner_id=self._user_id(owner) if owner is not None else (
                self.bot_user.id if type in THREAD_TYPES else None),
        )  # fmt: skip
        self.channels[channel.id] = channel
        guild.channel_ids.append(channel.id)
        event = "THREAD_CREATE" if channel.is_thread else "CHANNEL_CREATE"
        self._dispatch(event, channel.to_payload(), Intent.GUILDS)
        return channel

    def add_thread(
        self, parent_id: int, name: str, *, private: bool = False, owner: UserLike | None = None
    ) -> FakeChannel:
        parent = self.channels[parent_id]
        assert parent.guild_id is not None
        kind = ChannelType.PRIVATE_THREAD if private else ChannelType.PUBLIC_THREAD
        return self.add_channel(parent.guild_id, name, kind, parent_id=parent_id, owner=owner)

    def add_role(
        self,
        guild_id: int,
        name: str,
        permissions: PermissionLike = 0,
        *,
        mentionable: bool = False,
        color: int = 0,
        hoist: bool = False,
    ) -> FakeRole:
        guild = self.guilds[guild_id]
        role = FakeRole(
            self.snowflake(), guild_id, name, permission_value(permissions),
            position=len(guild.roles), color=color, hoist=hoist, mentionable=mentionable,
        )  # fmt: skip
        guild.roles[role.id] = role
        self._dispatch(
            "GUILD_ROLE_CREATE",
            {"guild_id": str(guild_id), "role": role.to_payload()},
            Intent.GUILDS,
        )
        return role

    def add_member(
        self,
        guild_id: int,
        user: FakeUser | str,
        *,
        roles: Sequence[FakeRole | int] = (),
        nick: str | None = None,
        permissions: PermissionLike | None = None,
    ) -> FakeMember:
        """Add a member (a new user when given a name).  ``permissions`` is a shortcut that
        gives the member a dedicated role with exactly those permissions."""
        guild = self.guilds[guild_id]
        if isinstance(user, str):
            user = self.add_user(user)
        role_ids = [r.id if isinstance(r, FakeRole) else int(r) for r in roles]
        if permissions is not None:
            role_ids.append(self.add_role(guild_id, f"{user.username}-perms", permissions).id)
        member = FakeMember(user, guild_id, role_ids, nick)
        guild.members[user.id] = member
        payload = member.to_payload() | {"guild_id": str(guild_id)}
        self._dispatch("GUILD_MEMBER_ADD", payload, Intent.GUILD_MEMBERS)
        return member

    def set_permission_overwrite(
        self,
        channel_id: int,
        target: FakeRole | FakeMember | FakeUser | int,
        *,
        allow: PermissionLike = 0,
        deny: PermissionLike = 0,
    ) -> None:
        """Set (replace) a channel overwrite for a role or member; dispatches CHANNEL_UPDATE."""
        channel = self.channels[channel_id]
        assert channel.guild_id is not None and not channel.is_thread
        guild = self.guilds[channel.guild_id]
        target_id = target.id if not isinstance(target, int) else target
        kind = 0 if target_id in guild.roles else 1
        channel.permission_overwrites = [
            o for o in channel.permission_overwrites if int(o["id"]) != target_id
        ]
        channel.permission_overwrites.append(
            {"id": str(target_id), "type": kind, "allow": str(permission_value(allow)),
             "deny": str(permission_value(deny))}
        )  # fmt: skip
        self._dispatch("CHANNEL_UPDATE", channel.to_payload(), Intent.GUILDS)

    def deny_bot_permissions(self, channel_id: int, *permissions: str) -> None:
        """E.g. ``fake.deny_bot_permissions(ch.id, "manage_webhooks")``: a member overwrite."""
        self.set_permission_overwrite(channel_id, self.bot_user, deny=permissions)

    def dm_channel(self, user: UserLike) -> FakeChannel:
        """The DM channel between the bot and ``user`` (created on first use)."""
        uid = self._user_id(user)
        if uid not in self._dm_by_user:
            channel = FakeChannel(
                id=self.snowflake(), type=ChannelType.DM, recipients=[self.users[uid]]
            )
            self.channels[channel.id] = channel
            self._dm_by_user[uid] = channel.id
        return self.channels[self._dm_by_user[uid]]

    def add_webhook(
        self, channel_id: int, name: str = "Captain Hook", *, creator: FakeUser | None = None
    ) -> FakeWebhook:
        """A webhook someone else (by default the guild owner) made in a channel."""
        channel = self.channels[channel_id]
        assert channel.guild_id is not None
        creator = creator or self.users[self.guilds[channel.guild_id].owner_id]
        return self._create_webhook(channel, name, creator, None)

    def delete_webhook(self, webhook_id: int) -> None:
        hook = self.webhooks.pop(webhook_id)
        self._dispatch(
            "WEBHOOKS_UPDATE",
            {"guild_id": _opt_str(hook.guild_id), "channel_id": str(hook.channel_id)},
            Intent.GUILD_WEBHOOKS,
        )

    # ---- permissions ----------------------------------------------------------------------

    def compute_permissions(
        self, guild_id: int, user_id: int, channel_id: int | None = None
    ) -> int:
        """Discord's algorithm: base role permissions, then @everyone/role/member overwrites."""
        guild = self.guilds[guild_id]
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        member = guild.members.get(user_id)
        if member is None:
            return 0
        perms = guild.everyone.permissions
        for rid in member.roles:
            perms |= guild.roles[rid].permissions if rid in guild.roles else 0
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        if channel_id is None:
            return perms
        channel = self.channels[channel_id]
        if channel.is_thread and channel.parent_id is not None:
            channel = self.channels[channel.parent_id]
        overwrites = {int(o["id"]): o for o in channel.permission_overwrites}

        def apply(perms: int, allow: int, deny: int) -> int:
            return (perms & ~deny) | allow

        if guild.id in overwrites:
            o = overwrites[guild.id]
            perms = apply(perms, int(o["allow"]), int(o["deny"]))
        allow = deny = 0
        for rid in member.roles:
            if rid in overwrites:
                allow |= int(overwrites[rid]["allow"])
                deny |= int(overwrites[rid]["deny"])
        perms = apply(perms, allow, deny)
        if user_id in overwrites:
            o = overwrites[user_id]
            perms = apply(perms, int(o["allow"]), int(o["deny"]))
        if not perms & VIEW_CHANNEL:
            return 0
        return perms

    def bot_permissions(self, channel_id: int) -> int:
        channel = self.channels[channel_id]
        if channel.guild_id is None:
            return permission_value(
                ["view_channel", "send_messages", "read_message_history", "embed_links",
                 "attach_files", "add_reactions", "use_application_commands"]
            )  # fmt: skip
        return self.compute_permissions(channel.guild_id, self.bot_user.id, channel_id)

    # ---- accessors ------------------------------------------------------------------------

    def channel_messages(
        self, channel_id: int, *, include_deleted: bool = False
    ) -> list[FakeMessage]:
        """Non-ephemeral messages of a channel, oldest first, in their current (edited) state."""
        msgs = [self.messages[m] for m in self._channel_messages.get(channel_id, [])]
        return [m for m in msgs if include_deleted or not m.deleted]

    def last_message(self, channel_id: int) -> FakeMessage | None:
        msgs = self.channel_messages(channel_id)
        return msgs[-1] if msgs else None

    def get_message(self, message_id: int) -> FakeMessage:
        return self.messages[message_id]

    def find_requests(
        self, method: str | None = None, path: str | None = None
    ) -> list[RecordedRequest]:
        """Recorded REST calls; ``path`` is a regex (``{name}`` placeholders allowed), fullmatched."""
        pattern = self._compile_path(path) if path is not None else None
        return [
            r for r in self.requests
            if (method is None or r.method == method.upper())
            and (pattern is None or pattern.fullmatch(r.path))
        ]  # fmt: skip

    def commands(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """The registered command definitions (global, or one guild's)."""
        return copy.deepcopy(self._commands.get(guild_id, []))

    def interactions(self) -> list[InteractionHandle]:
        return list(self._interactions.values())

    # ---- failure injection ----------------------------------------------------------------

    @staticmethod
    def _compile_path(pattern: str) -> re.Pattern[str]:
        return re.compile(_PLACEHOLDER.sub("[^/]+", pattern))

    def inject(
        self,
        method: str,
        path_pattern: str,
        status: int = 429,
        *,
        retry_after: float = 0.05,
        times: int = 1,
        global_: bool = False,
        body: dict[str, Any] | None = None,
    ) -> Injection:
        """Make the next ``times`` matching REST calls fail with ``status``.

        ``method`` may be "*"; ``path_pattern`` is a regex fullmatched against the path after
        /api/v10, where ``{name}`` placeholders match one segment, e.g.
        ``"/channels/{channel_id}/messages/{message_id}"``.  A 429 carries Discord's body and
        headers (``Via`` included: without it discord.py takes a 429 for a Cloudflare ban).
        Note discord.py sleeps 1 s (then 3 s, 5 s...) before retrying a 500/502/504."""
        injection = Injection(
            method.upper(),
            self._compile_path(path_pattern),
            status,
            retry_after,
            times,
            global_,
            body,
        )
        self.injections.append(injection)
        return injection

    def _take_injection(self, method: str, path: str) -> Injection | None:
        for inj in self.injections:
            if inj.remaining > 0 and inj.method in ("*", method) and inj.pattern.fullmatch(path):
                inj.remaining -= 1
                inj.hits += 1
                return inj
        return None

    def _injected_response(self, inj: Injection, bucket: str) -> web.Response:
        headers = {"Via": "1.1 google"}
        if inj.status == 429:
            body = inj.body or {
                "message": "You are being rate limited.", "retry_after": inj.retry_after,
                "global": inj.global_,
            }  # fmt: skip
            headers.update({
                "Retry-After": str(max(1, math.ceil(inj.retry_after))),
                "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + inj.retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{inj.retry_after:.3f}",
                "X-RateLimit-Bucket": bucket,
                "X-RateLimit-Scope": "global" if inj.global_ else "user",
            })  # fmt: skip
            if inj.global_:
                headers["X-RateLimit-Global"] = "true"
        else:
            reason = web.Response(status=inj.status).reason
            body = inj.body or {"message": f"{inj.status}: {reason}", "code": 0}
        return self._json_response(body, inj.status, headers)

    # ---- gateway --------------------------------------------------------------------------

    def _dispatch(
        self,
        event: str,
        data: dict[str, Any] | Callable[[_Session | None], dict[str, Any]],
        intents: int = 0,
    ) -> None:
        """Send a dispatch to every live session whose intents cover it."""
        self.dispatched.append((event, data(None) if callable(data) else data))
        for session in [s for s in self._sessions.values() if not s.invalid]:
            if intents and not session.intents & intents:
                continue
            self._send_dispatch(session, event, data(session) if callable(data) else data)
        self._notify()

    def _send_dispatch(self, session: _Session, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        payload = {"op": 0, "t": event, "s": session.seq, "d": data}
        session.buffer.append(payload)
        if session.connection is not None:
            session.connection.send(payload)

    async def _flush(self) -> None:
        """Wait until everything queued on live websockets has been written."""
        for conn in list(self._connections):
            await conn.drain()

    async def _gateway_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=0)
        await ws.prepare(request)
        self.gateway_connections.append((request.path, dict(request.query)))
        conn = _GatewayConnection(ws, request.query.get("compress"), request.path)
        self._connections.add(conn)
        if request.query.get("encoding", "json") != "json":
            conn.close(4002)
        conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval, "_trace": ["fake"]},
                   "s": None, "t": None})  # fmt: skip
        try:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    try:
                        payload = json.loads(msg.data)
                    except ValueError:
                        conn.close(4002)
                        continue
                    self._on_gateway_payload(conn, payload)
                elif msg.type is WSMsgType.BINARY:
                    conn.close(4002)
        finally:
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                # a client closing with 1000/1001 ends its session; other closes are resumable
                if not conn.server_closed and ws.close_code in (1000, 1001):
                    self._end_session(session)
            await conn.stop()
            self._notify()
        return ws

    def _end_session(self, session: _Session) -> None:
        """Not resumable any more: a RESUME of it gets INVALID_SESSION."""
        session.invalid = True
        self._sessions.pop(session.id, None)

    def _on_gateway_payload(self, conn: _GatewayConnection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == 1:
            conn.heartbeats += 1
            self.heartbeat_count += 1
            if self.ack_heartbeats:
                conn.send({"op": 11, "d": None, "s": None, "t": None})
        elif op == 2:
            self._identify(conn, data or {})
        elif op == 6:
            self._resume(conn, data or {})
        elif conn.session is None:
            conn.close(4003)  # not authenticated
        elif op == 8:
            self._request_members(conn.session, data or {})
        elif op in (3, 4):
            pass  # presence / voice state updates: accepted and ignored
        else:
            conn.close(4001)  # unknown opcode
        self._notify()

    def _identify(self, conn: _GatewayConnection, data: dict[str, Any]) -> None:
        if conn.session is not None:
            conn.close(4005)  # already authenticated
            return
        if data.get("token") not in (self.token, f"Bot {self.token}"):
            conn.close(4004)  # authentication failed
            return
        intents = int(data.get("intents", 0))
        if intents & Intent.PRIVILEGED & ~self.privileged_intents:
            conn.close(4014)  # disallowed intents
            return
        session = _Session(id=secrets.token_hex(16), intents=intents, shard=data.get("shard"))
        self._sessions[session.id] = session
        conn.session = session
        session.connection = conn
        self.identify_count += 1
        ready: dict[str, Any] = {
            "v": 10, "user": self._me_payload(), "session_type": "normal",
            "guilds": [{"id": str(g), "unavailable": True} for g in self.guilds],
            "session_id": session.id,
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway-resume",
            "application": {"id": str(self.application_id), "flags": self.application_flags},
            "private_channels": [], "relationships": [], "presences": [], "_trace": ["fake"],
        }  # fmt: skip
        if session.shard is not None:
            ready["shard"] = session.shard
        self._send_dispatch(session, "READY", ready)
        if intents & Intent.GUILDS:
            for guild in self.guilds.values():
                self._send_dispatch(session, "GUILD_CREATE", self._guild_payload(guild))

    def _resume(self, conn: _GatewayConnection, data: dict[str, Any]) -> None:
        session = self._sessions.get(str(data.get("session_id")))
        if (
            session is None
            or session.invalid
            or data.get("token") not in (self.token, f"Bot {self.token}")
        ):
            conn.send({"op": 9, "d": False, "s": None, "t": None})
            return
        old = session.connection
        if old is not None and old is not conn:
            old.session = None
            old.close(4009)
        conn.session = session
        seq = int(data.get("seq") or 0)
        for payload in session.buffer:
            if payload["s"] > seq:
                conn.send(payload)
        session.connection = conn
        self.resume_count += 1
        self._send_dispatch(session, "RESUMED", {"_trace": ["fake"]})

    def _request_members(self, session: _Session, data: dict[str, Any]) -> None:
        guild = self.guilds.get(int(data.get("guild_id", 0)))
        if guild is None:
            return
        members = list(guild.members.values())
        user_ids = {int(u) for u in data.get("user_ids") or []}
        if user_ids:
            members = [m for m in members if m.id in user_ids]
        elif data.get("query"):
            members = [
                m for m in members if m.user.username.lower().startswith(data["query"].lower())
            ]
        if data.get("limit"):
            members = members[: int(data["limit"])]
        chunk: dict[str, Any] = {
            "guild_id": str(guild.id), "members": [m.to_payload() for m in members],
            "chunk_index": 0, "chunk_count": 1,
        }  # fmt: skip
        if user_ids:
            chunk["not_found"] = [str(u) for u in user_ids - {m.id for m in members}]
        if data.get("presences"):
            chunk["presences"] = []
        if data.get("nonce") is not None:
            chunk["nonce"] = data["nonce"]
        self._send_dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)

    async def disconnect_gateway(self, *, resumable: bool = True, code: int = 4000) -> None:
        """Drop every live websocket.  ``resumable``: close with ``code`` (4000 by default),
        discord.py reconnects at once and RESUMEs, getting missed dispatches replayed.
        Otherwise send INVALID_SESSION(false): discord.py re-IDENTIFYs from scratch."""
        for conn in list(self._connections):
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                if not resumable:
                    self._end_session(session)
            if resumable:
                conn.close(code)
            else:
                conn.server_closed = True
                conn.send({"op": 9, "d": False, "s": None, "t": None})
        await self._flush()

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before moving a session; the client resumes."""
        for conn in list(self._connections):
            conn.server_closed = True
            conn.send({"op": 7, "d": None, "s": None, "t": None})
        await self._flush()

    # ---- test-driven events ---------------------------------------------------------------

    async def user_message(
        self,
        channel_id: int,
        author: UserLike,
        content: str = "",
        *,
        mentions: Sequence[UserLike] = (),
        mention_roles: Sequence[FakeRole | int] = (),
        reply_to: FakeMessage | int | None = None,
        mention_author: bool = True,
        attachments: Sequence[FakeFile] = (),
        embeds: Sequence[dict[str, Any]] = (),
    ) -> FakeMessage:
        """A user posts; dispatches MESSAGE_CREATE.  Mentions are parsed from ``<@id>`` /
        ``<@&id>`` / @everyone in the content, plus the explicit ``mentions``/``mention_roles``;
        a reply mentions the replied-to author unless ``mention_author=False``."""
        channel = self.channels[channel_id]
        user = self.users[self._user_id(author)]
        if channel.guild_id is not None and user.id not in self.guilds[channel.guild_id].members:
            raise ValueError(f"{user.username} is not a member of guild {channel.guild_id}")
        ref = self._resolve_message(reply_to) if reply_to is not None else None
        msg = FakeMessage(
            id=self.snowflake(), channel_id=channel.id, guild_id=channel.guild_id, author=user,
            content=content, embeds=[dict(e) for e in embeds], type=19 if ref else 0,
            reference_id=ref.id if ref else None,
        )  # fmt: skip
        msg.attachments = [self._store_attachment(channel.id, f) for f in attachments]
        am: dict[str, Any] = {
            "parse": ["users", "roles", "everyone"],
            "replied_user": mention_author,
        }
        self._compute_mentions(msg, am)
        for extra in mentions:
            if self._user_id(extra) not in msg.mentions:
                msg.mentions.append(self._user_id(extra))
        for role in mention_roles:
            rid = role.id if isinstance(role, FakeRole) else int(role)
            if rid not in msg.mention_roles:
                msg.mention_roles.append(rid)
        self._post(msg)
        await self._flush()
        return msg

    async def edit_user_message(
        self,
        message: FakeMessage | int,
        content: str | None = None,
        *,
        embeds: Sequence[dict[str, Any]] | None = None,
    ) -> FakeMessage:
        """A user edits their message; dispatches MESSAGE_UPDATE."""
        msg = self._resolve_message(message)
        if content is not None and content != msg.content:
            msg.history.append(msg.content)
            msg.content = content
        if embeds is not None:
            msg.embeds = [dict(e) for e in embeds]
        msg.edited_at = _now()
        self._compute_mentions(msg, {"parse": ["users", "roles", "everyone"]})
        self._dispatch_message("MESSAGE_UPDATE", msg)
        await self._flush()
        return msg

    async def delete_message(self, message: FakeMessage | int) -> None:
        """Someone deletes a message; dispatches MESSAGE_DELETE."""
        self._delete(self._resolve_message(message))
        await self._flush()

    async def add_reaction(self, message: FakeMessage | int, user: UserLike, emoji: str) -> None:
        msg = self._resolve_message(message)
        self._react(msg, self.users[self._user_id(user)], emoji, add=True)
        await self._flush()

    async def user_typing(self, channel_id: int, user: UserLike) -> None:
        channel = self.channels[channel_id]
        data: dict[str, Any] = {
            "channel_id": str(channel_id), "user_id": str(self._user_id(user)),
            "timestamp": int(time.time()),
        }  # fmt: skip
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
            member = self.guilds[channel.guild_id].members.get(self._user_id(user))
            if member is not None:
                data["member"] = member.to_payload()
        intent = Intent.GUILD_MESSAGE_TYPING if channel.guild_id else Intent.DIRECT_MESSAGE_TYPING
        self._dispatch("TYPING_START", data, intent)
        await self._flush()

    # ---- interactions ---------------------------------------------------------------------

    async def invoke_command(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        respond_within: float = 3.0,
        locale: str = "en-US",
    ) -> InteractionHandle:
        """Run a *registered* slash command, e.g. ``("persona use", {"name": "Aria"})``.

        Subcommand groups/subcommands become nested type 2/1 options; values are converted
        by the registered option types (users/members/channels/roles/attachments go into
        ``resolved``; an attachment option takes a :class:`FakeFile`).  The bot must make its
        initial callback within ``respond_within`` seconds, or gets 404 Unknown interaction."""
        data = self._command_data(channel_id, name, dict(options or {}), focused=None)
        return await self._interact(
            2, channel_id, user, data, respond_within, locale=locale, command_name=name
        )

    async def autocomplete(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        timeout: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Send an autocomplete interaction for option ``focused``; return the bot's choices."""
        data = self._command_data(channel_id, name, dict(options), focused=focused)
        handle = await self._interact(4, channel_id, user, data, timeout, command_name=name)
        response = await handle.wait_response(timeout)
        return response.choices

    async def invoke_context_menu(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        target: FakeMessage | UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Run a registered user (type 2) or message (type 3) context-menu command."""
        guild_id = self.channels[channel_id].guild_id
        kind = 3 if isinstance(target, FakeMessage) else 2
        cmd = self._find_command(name, guild_id, kind)
        resolved: dict[str, Any] = {}
        if isinstance(target, FakeMessage):
            target_id = target.id
            resolved["messages"] = {str(target.id): self._message_payload(target)}
        else:
            target_id = self._user_id(target)
            self._resolve_user(target_id, guild_id, channel_id, resolved)
        data = {"id": str(cmd["id"]), "name": cmd["name"], "type": kind,
                "target_id": str(target_id), "resolved": resolved}  # fmt: skip
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._interact(2, channel_id, user, data, respond_within, command_name=name)

    async def click_button(
        self,
        message: FakeMessage | int,
        custom_id: str,
        user: UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Click a button the bot put on a message (ephemeral messages too)."""
        msg = self._resolve_message(message)
        component = self._find_component(msg, custom_id)
        if component.get("disabled"):
            raise ValueError(f"button {custom_id!r} is disabled")
        data = {"custom_id": custom_id, "component_type": component["type"]}
        return await self._interact(
            3, msg.channel_id, user, data, respond_within, component_message=msg
        )

    async def select_option(
        self,
        message: FakeMessage | int,
        custom_id: str,
        values: Sequence[str],
        user: UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Pick values in a select menu the bot put on a message."""
        msg = self._resolve_message(message)
        component = self._find_component(msg, custom_id)
        offered = [o["value"] for o in component.get("options") or []]
        if component["type"] == 3 and any(v not in offered for v in values):
            raise ValueError(f"{list(values)} not all among the options {offered}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"],
                                "values": [str(v) for v in values]}  # fmt: skip
        if component["type"] in (5, 6, 7, 8):
            resolved: dict[str, Any] = {}
            for value in values:
                self._resolve_mentionable(int(value), msg.guild_id, msg.channel_id, resolved)
            data["resolved"] = resolved
        return await self._interact(
            3, msg.channel_id, user, data, respond_within, component_message=msg
        )

    async def submit_modal(
        self,
        handle: InteractionHandle,
        values: Mapping[str, str | Sequence[str]],
        user: UserLike | None = None,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Submit the modal the bot answered ``handle`` with (callback type 9).  ``values``
        maps each input's custom_id to its text (or a list of values for selects)."""
        if handle.response is None or handle.response.type != 9:
            raise ValueError("that interaction was not answered with a modal")
        modal = handle.response.data

        def build(comp: dict[str, Any]) -> dict[str, Any]:
            kind = comp.get("type")
            out: dict[str, Any] = {"type": kind, "id": comp.get("id")}
            if kind == 1:
                out["components"] = [build(c) for c in comp.get("components", [])]
            elif kind == 18:
                out["component"] = build(comp["component"])
            elif kind == 4:
                out.update(custom_id=comp["custom_id"],
                           value=str(values.get(comp["custom_id"], comp.get("value") or "")))  # fmt: skip
            elif "custom_id" in comp:
                picked = values.get(comp["custom_id"], [])
                out.update(
                    custom_id=comp["custom_id"],
                    values=[picked] if isinstance(picked, str) else list(picked),
                )
            return out

        data = {
            "custom_id": modal["custom_id"],
            "components": [build(c) for c in modal.get("components", [])],
        }
        return await self._interact(
            5, handle.channel_id, user if user is not None else handle.user, data, respond_within,
            component_message=handle.component_message,
        )  # fmt: skip

    async def _interact(
        self,
        kind: int,
        channel_id: int,
        user: UserLike,
        data: dict[str, Any],
        respond_within: float,
        *,
        locale: str = "en-US",
        command_name: str | None = None,
        component_message: FakeMessage | None = None,
    ) -> InteractionHandle:
        channel = self.channels[channel_id]
        fake_user = self.users[self._user_id(user)]
        iid, token = self.snowflake(), secrets.token_urlsafe(24)
        payload: dict[str, Any] = {
            "id": str(iid), "application_id": str(self.application_id), "type": kind, "data": data,
            "channel": channel.to_payload(), "channel_id": str(channel_id), "token": token,
            "version": 1, "locale": locale, "entitlements": [], "attachment_size_limit": 10 * 2**20,
            "app_permissions": str(self.bot_permissions(channel_id)),
        }  # fmt: skip
        if channel.guild_id is not None:
            guild = self.guilds[channel.guild_id]
            member = guild.members.get(fake_user.id)
            if member is None:
                raise ValueError(f"{fake_user.username} is not a member of guild {guild.id}")
            perms = self.compute_permissions(guild.id, fake_user.id, channel_id)
            payload.update(
                guild_id=str(guild.id), guild_locale="en-US", context=0,
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                member=member.to_payload() | {"permissions": str(perms)},
                authorizing_integration_owners={"0": str(guild.id)},
            )  # fmt: skip
        else:
            payload.update(user=fake_user.to_payload(), context=1,
                           authorizing_integration_owners={"0": str(fake_user.id)})  # fmt: skip
        if component_message is not None:
            payload["message"] = self._message_payload(component_message)
        handle = InteractionHandle(
            self, id=iid, token=token, type=kind, payload=payload, channel_id=channel_id,
            guild_id=channel.guild_id, user=fake_user,
            deadline=asyncio.get_running_loop().time() + respond_within,
            command_name=command_name, component_message=component_message,
        )  # fmt: skip
        self._interactions[iid] = handle
        self._dispatch("INTERACTION_CREATE", payload)
        await self._flush()
        return handle

    def _find_command(self, name: str, guild_id: int | None, kind: int = 1) -> dict[str, Any]:
        scopes = ([guild_id] if guild_id is not None else []) + [None]
        for scope in scopes:
            for cmd in self._commands.get(scope, []):
                if cmd["name"] == name and cmd.get("type", 1) == kind:
                    return cmd
        known = sorted(c["name"] for s in scopes for c in self._commands.get(s, []))
        raise LookupError(f"no registered command {name!r} (type {kind}); registered: {known}")

    def _command_data(
        self, channel_id: int, name: str, options: dict[str, Any], *, focused: str | None
    ) -> dict[str, Any]:
        guild_id = self.channels[channel_id].guild_id
        parts = name.split()
        cmd = self._find_command(parts[0], guild_id)
        data: dict[str, Any] = {"id": str(cmd["id"]), "name": cmd["name"], "type": 1}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        defs: list[dict[str, Any]] = cmd.get("options") or []
        container: list[dict[str, Any]] = []
        data["options"] = container
        for part in parts[1:]:
            sub = next((o for o in defs if o["name"] == part and o["type"] in (1, 2)), None)
            if sub is None:
                raise LookupError(f"{name!r}: no subcommand {part!r}")
            node: dict[str, Any] = {"name": part, "type": sub["type"], "options": []}
            container.append(node)
            container, defs = node["options"], sub.get("options") or []
        if any(o["type"] in (1, 2) for o in defs):
            raise ValueError(f"{name!r} needs a subcommand: {[o['name'] for o in defs]}")
        resolved: dict[str, Any] = {}
        by_name = {o["name"]: o for o in defs}
        for key, value in options.items():
            if key not in by_name:
                raise LookupError(f"{name!r} has no option {key!r}; it has {sorted(by_name)}")
            opt = by_name[key]
            entry: dict[str, Any] = {"name": key, "type": opt["type"]}
            if key == focused:
                entry.update(value=str(value), focused=True)
            else:
                entry["value"] = self._option_value(opt, value, guild_id, channel_id, resolved)
            container.append(entry)
        if focused is None:
            missing = [o["name"] for o in defs if o.get("required") and o["name"] not in options]
            if missing:
                raise ValueError(f"{name!r}: missing required option(s) {missing}")
        if resolved:
            data["resolved"] = resolved
        return data

    def _option_value(
        self,
        opt: dict[str, Any],
        value: Any,
        guild_id: int | None,
        channel_id: int,
        resolved: dict[str, Any],
    ) -> Any:
        kind = opt["type"]
        if kind == 3:
            result: Any = str(value)
        elif kind == 4:
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"option {opt['name']!r} wants an integer, got {value!r}")
            result = int(value)
        elif kind == 5:
            result = bool(value)
        elif kind == 10:
            result = float(value)
        elif kind == 6:
            uid = self._user_id(value)
            self._resolve_user(uid, guild_id, channel_id, resolved)
            result = str(uid)
        elif kind == 7:
            cid = value.id if isinstance(value, FakeChannel) else int(value)
            self._resolve_channel(cid, resolved)
            result = str(cid)
        elif kind == 8:
            rid = value.id if isinstance(value, FakeRole) else int(value)
            self._resolve_role(rid, guild_id, resolved)
            result = str(rid)
        elif kind == 9:
            mid = value.id if isinstance(value, FakeRole | FakeUser | FakeMember) else int(value)
            self._resolve_mentionable(mid, guild_id, channel_id, resolved)
            result = str(mid)
        elif kind == 11:
            if not isinstance(value, FakeFile):
                raise TypeError(f"option {opt['name']!r} wants a FakeFile")
            att = self._store_attachment(channel_id, value, ephemeral=True)
            resolved.setdefault("attachments", {})[str(att.id)] = att.to_payload()
            result = str(att.id)
        else:
            raise ValueError(f"unsupported option type {kind}")
        choices = opt.get("choices")
        if choices and result not in [c["value"] for c in choices]:
            raise ValueError(f"{result!r} is not a choice of {opt['name']!r}: {choices}")
        return result

    def _resolve_user(
        self, uid: int, guild_id: int | None, channel_id: int, resolved: dict[str, Any]
    ) -> None:
        resolved.setdefault("users", {})[str(uid)] = self.users[uid].to_payload()
        member = self.guilds[guild_id].members.get(uid) if guild_id is not None else None
        if member is not None:
            perms = self.compute_permissions(guild_id, uid, channel_id)  # type: ignore[arg-type]
            resolved.setdefault("members", {})[str(uid)] = member.to_payload(with_user=False) | {
                "permissions": str(perms)
            }

    def _resolve_role(self, rid: int, guild_id: int | None, resolved: dict[str, Any]) -> None:
        if guild_id is None or rid not in self.guilds[guild_id].roles:
            raise LookupError(f"unknown role {rid}")
        resolved.setdefault("roles", {})[str(rid)] = self.guilds[guild_id].roles[rid].to_payload()

    def _resolve_channel(self, cid: int, resolved: dict[str, Any]) -> None:
        channel = self.channels[cid]
        entry: dict[str, Any] = {
            "id": str(cid), "name": channel.name, "type": channel.type,
            "permissions": str(self.bot_permissions(cid)), "parent_id": _opt_str(channel.parent_id),
        }  # fmt: skip
        if channel.is_thread:
            entry["thread_metadata"] = channel.to_payload()["thread_metadata"]
        resolved.setdefault("channels", {})[str(cid)] = entry

    def _resolve_mentionable(
        self, mid: int, guild_id: int | None, channel_id: int, resolved: dict[str, Any]
    ) -> None:
        if guild_id is not None and mid in self.guilds[guild_id].roles:
            self._resolve_role(mid, guild_id, resolved)
        elif mid in self.channels:
            self._resolve_channel(mid, resolved)
        else:
            self._resolve_user(mid, guild_id, channel_id, resolved)

    @staticmethod
    def _find_component(msg: FakeMessage, custom_id: str) -> dict[str, Any]:
        def walk(items: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
            for item in items:
                yield item
                yield from walk(item.get("components") or [])
                for key in ("component", "accessory"):
                    if isinstance(item.get(key), dict):
                        yield from walk([item[key]])

        for comp in walk(msg.components):
            if comp.get("custom_id") == custom_id:
                return comp
        raise LookupError(f"message {msg.id} has no component {custom_id!r}")

    # ---- message plumbing -----------------------------------------------------------------

    def _user_id(self, user: UserLike) -> int:
        if isinstance(user, FakeUser | FakeMember):
            return user.id
        return int(user)

    def _resolve_message(self, message: FakeMessage | int) -> FakeMessage:
        return message if isinstance(message, FakeMessage) else self.messages[int(message)]

    def _store_attachment(
        self, channel_id: int, f: FakeFile, *, ephemeral: bool = False
    ) -> FakeAttachment:
        aid = self.snowflake()
        att = FakeAttachment(
            id=aid, filename=f.filename, data=f.data, content_type=f.content_type,
            description=f.description, ephemeral=ephemeral,
            url=f"{self.base_url}/attachments/{channel_id}/{aid}/{f.filename}",
        )  # fmt: skip
        self._attachments[aid] = att
        return att

    def _compute_mentions(
        self, msg: FakeMessage, allowed: dict[str, Any] | None, *, check_author: bool = False
    ) -> None:
        """Fill ``mentions``/``mention_roles``/``mention_everyone`` the way Discord does: only
        what the content mentions *and* ``allowed_mentions`` lets through (absent = all)."""
        if allowed is None:
            allowed = {"parse": ["users", "roles", "everyone"], "replied_user": True}
        parse = set(allowed.get("parse") or [])
        users = {int(u) for u in allowed.get("users") or []}
        roles = {int(r) for r in allowed.get("roles") or []}
        content = msg.content or ""
        guild = self.guilds.get(msg.guild_id) if msg.guild_id is not None else None
        author_perms = 0
        if check_author and guild is not None and msg.webhook_id is None:
            author_perms = self.compute_permissions(guild.id, msg.author.id, msg.channel_id)
        can_ping_all = (
            not check_author or msg.webhook_id is not None or bool(author_perms & MENTION_EVERYONE)
        )
        msg.mentions = []
        for uid in map(int, _MENTION_USER.findall(content)):
            if uid in self.users and uid not in msg.mentions and ("users" in parse or uid in users):
                msg.mentions.append(uid)
        msg.mention_roles = []
        for rid in map(int, _MENTION_ROLE.findall(content)):
            role = guild.roles.get(rid) if guild else None
            if role is None or rid in msg.mention_roles or not ("roles" in parse or rid in roles):
                continue
            if role.mentionable or can_ping_all:
                msg.mention_roles.append(rid)
        msg.mention_everyone = (
            ("@everyone" in content or "@here" in content) and "everyone" in parse and can_ping_all
        )
        if msg.reference_id is not None and allowed.get("replied_user"):
            ref = self.messages.get(msg.reference_id)
            if ref is not None and ref.webhook_id is None and ref.author.id not in msg.mentions:
                msg.mentions.append(ref.author.id)

    def _message_payload(
        self,
        msg: FakeMessage,
        *,
        gateway: bool = False,
        depth: int = 0,
        session: _Session | None = None,
    ) -> dict[str, Any]:
        guild = self.guilds.get(msg.guild_id) if msg.guild_id is not None else None
        author = msg.author.to_payload()
        data: dict[str, Any] = {
            "id": str(msg.id), "channel_id": str(msg.channel_id), "author": author,
            "content": msg.content, "timestamp": _iso(msg.created_at),
            "edited_timestamp": _iso(msg.edited_at), "tts": msg.tts,
            "mention_everyone": msg.mention_everyone, "mentions": [],
            "mention_roles": [str(r) for r in msg.mention_roles],
            "attachments": [a.to_payload() for a in msg.attachments],
            "embeds": copy.deepcopy(msg.embeds), "components": copy.deepcopy(msg.components),
            "pinned": False, "type": msg.type, "flags": msg.flags, "sticker_items": [],
        }  # fmt: skip
        for uid in msg.mentions:
            entry = self.users[uid].to_payload()
            member = guild.members.get(uid) if guild else None
            if member is not None:
                entry["member"] = member.to_payload(with_user=False)
            data["mentions"].append(entry)
        if msg.nonce is not None:
            data["nonce"] = msg.nonce
        if msg.webhook_id is not None:
            data["webhook_id"] = str(msg.webhook_id)
        if msg.application_id is not None:
            data["application_id"] = str(msg.application_id)
        if msg.interaction_metadata is not None:
            data["interaction_metadata"] = copy.deepcopy(msg.interaction_metadata)
        if msg.reactions:
            data["reactions"] = [
                {"emoji": {"id": None, "name": emoji}, "count": len(users),
                 "count_details": {"burst": 0, "normal": len(users)}, "burst_colors": [],
                 "me": self.bot_user.id in users, "me_burst": False}
                for emoji, users in msg.reactions.items() if users
            ]  # fmt: skip
        if msg.reference_id is not None:
            ref = self.messages.get(msg.reference_id)
            data["message_reference"] = {
                "type": 0, "message_id": str(msg.reference_id), "channel_id": str(msg.channel_id),
                "guild_id": _opt_str(msg.guild_id),
            }  # fmt: skip
            if depth == 0:
                data["referenced_message"] = (
                    None if ref is None or ref.deleted else self._message_payload(ref, depth=1)
                )
        if gateway and guild is not None:
            data["guild_id"] = str(guild.id)
            member = guild.members.get(msg.author.id)
            if member is not None and msg.webhook_id is None:
                data["member"] = member.to_payload(with_user=False)
        if session is not None and not self._content_visible(msg, session):
            data.update(content="", embeds=[], attachments=[], components=[])
        return data

    def _content_visible(self, msg: FakeMessage, session: _Session) -> bool:
        """The MESSAGE_CONTENT privileged intent rule."""
        return (
            bool(session.intents & Intent.MESSAGE_CONTENT)
            or msg.guild_id is None
            or msg.author.id == self.bot_user.id
            or self.bot_user.id in msg.mentions
        )

    def _dispatch_message(self, event: str, msg: FakeMessage) -> None:
        if msg.ephemeral:
            return  # Discord never dispatches ephemeral messages
        intent = Intent.GUILD_MESSAGES if msg.guild_id is not None else Intent.DIRECT_MESSAGES
        self._dispatch(event, lambda s: self._message_payload(msg, gateway=True, session=s), intent)

    def _post(self, msg: FakeMessage) -> None:
        """Store a new message and dispatch it (ephemeral ones are only stored)."""
        self.messages[msg.id] = msg
        if not msg.ephemeral:
            self._channel_messages.setdefault(msg.channel_id, []).append(msg.id)
            self.channels[msg.channel_id].last_message_id = msg.id
        self._dispatch_message("MESSAGE_CREATE", msg)

    def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        if msg.ephemeral:
            self._notify()
            return
        data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
        intent = Intent.GUILD_MESSAGES if msg.guild_id is not None else Intent.DIRECT_MESSAGES
        self._dispatch("MESSAGE_DELETE", data, intent)

    def _react(self, msg: FakeMessage, user: FakeUser, emoji: str, *, add: bool) -> None:
        users = msg.reactions.setdefault(emoji, set())
        if (user.id in users) == add:
            return
        (users.add if add else users.discard)(user.id)
        data: dict[str, Any] = {
            "user_id": str(user.id), "channel_id": str(msg.channel_id), "message_id": str(msg.id),
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0,
        }  # fmt: skip
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
            member = self.guilds[msg.guild_id].members.get(user.id)
            if add and member is not None:
                data["member"] = member.to_payload()
        if add:
            data["message_author_id"] = str(msg.author.id)
        intent = Intent.GUILD_MESSAGE_REACTIONS if msg.guild_id else Intent.DIRECT_MESSAGE_REACTIONS
        self._dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data, intent)

    @staticmethod
    def _validate_message_body(body: dict[str, Any]) -> None:
        """Discord's length limits, with its real error shape (code 50035)."""
        errors: dict[str, Any] = {}
        content = body.get("content")
        if content is not None and len(str(content)) > MAX_CONTENT_LENGTH:
            errors["content"] = _max_len(MAX_CONTENT_LENGTH)
        embeds = body.get("embeds") or []
        embed_errors: dict[str, Any] = {}
        if len(embeds) > 10:
            embed_errors.update(_max_len(10))
        total = 0
        for index, embed in enumerate(embeds):
            problems: dict[str, Any] = {}
            for key, limit in (("title", 256), ("description", MAX_EMBED_DESCRIPTION)):
                text = embed.get(key) or ""
                total += len(text)
                if len(text) > limit:
                    problems[key] = _max_len(limit)
            for key, sub, limit in (("footer", "text", 2048), ("author", "name", 256)):
                text = (embed.get(key) or {}).get(sub) or ""
                total += len(text)
                if len(text) > limit:
                    problems[key] = {sub: _max_len(limit)}
            for fi, fld in enumerate(embed.get("fields") or []):
                for key, limit in (("name", 256), ("value", 1024)):
                    text = str(fld.get(key) or "")
                    total += len(text)
                    if len(text) > limit:
                        problems.setdefault("fields", {}).setdefault(str(fi), {})[key] = _max_len(
                            limit
                        )
            if problems:
                embed_errors[str(index)] = problems
        if total > 6000:
            embed_errors.update(
                _field_error("MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
            )
        if embed_errors:
            errors["embeds"] = embed_errors
        if errors:
            raise _form_error(errors)

    @staticmethod
    def _require_nonempty(msg: FakeMessage) -> None:
        if not (msg.content or msg.embeds or msg.attachments or msg.components):
            raise ApiError(400, "Cannot send an empty message", 50006)

    def _apply_body(
        self, msg: FakeMessage, body: dict[str, Any], files: list[FakeFile], *, creating: bool
    ) -> None:
        """Apply a create/edit JSON body (and uploaded ``files[n]``) to ``msg``."""
        self._validate_message_body(body)
        if "content" in body:
            new = body["content"] or ""
            if not creating and new != msg.content:
                msg.history.append(msg.content)
            msg.content = str(new)
        if "embeds" in body:
            msg.embeds = copy.deepcopy(body["embeds"] or [])
        if "components" in body:
            msg.components = copy.deepcopy(body["components"] or [])
        if body.get("flags") is not None:  # ephemerality is fixed when a message is created
            keep = msg.flags & MessageFlag.EPHEMERAL
            msg.flags = keep | (int(body["flags"]) & ~(MessageFlag.LOADING | MessageFlag.EPHEMERAL))
        msg.flags &= ~MessageFlag.LOADING
        if creating:
            msg.tts = bool(body.get("tts"))
            msg.nonce = body.get("nonce")
        by_index = dict(enumerate(files))
        if "attachments" in body and body["attachments"] is not None:
            kept: list[FakeAttachment] = []
            old = {a.id: a for a in msg.attachments}
            for item in body["attachments"]:
                ident = int(item["id"])
                if ident in by_index:
                    f = by_index.pop(ident)
                    f.description = item.get("description", f.description)
                    kept.append(self._store_attachment(msg.channel_id, f))
                elif ident in old:
                    kept.append(old[ident])
            msg.attachments = kept
        msg.attachments = msg.attachments + [
            self._store_attachment(msg.channel_id, f) for f in by_index.values()
        ]
        if "allowed_mentions" in body:
            msg.allowed_mentions = copy.deepcopy(body["allowed_mentions"])
        self._compute_mentions(msg, msg.allowed_mentions, check_author=True)
        self._require_nonempty(msg)

    def _edit(
        self, msg: FakeMessage, body: dict[str, Any], files: list[FakeFile]
    ) -> dict[str, Any]:
        was_loading = msg.loading
        snapshot = copy.copy(msg)
        snapshot.history = list(msg.history)
        self._apply_body(snapshot, body, files, creating=False)
        if was_loading:
            snapshot.history = list(msg.history)  # the "thinking" placeholder is not a version
        msg.__dict__.update(snapshot.__dict__)  # only commit a body that validated
        if not was_loading:
            msg.edited_at = _now()
        self._dispatch_message("MESSAGE_UPDATE", msg)
        return self._message_payload(msg)

    # ---- REST plumbing --------------------------------------------------------------------

    @staticmethod
    def _json_response(
        body: Any, status: int = 200, headers: dict[str, str] | None = None
    ) -> web.Response:
        # exactly "application/json": discord.py compares the header verbatim
        all_headers = {"Content-Type": "application/json"} | (headers or {})
        return web.Response(body=json.dumps(body).encode(), status=status, headers=all_headers)

    @web.middleware
    async def _api_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        path = request.path[len(API_PREFIX) :]
        body, files = await self._read_body(request)
        record = RecordedRequest(
            method=request.method, path=path, query=dict(request.query), json=body, files=files,
            headers=dict(request.headers),
        )  # fmt: skip
        request[_CALL_KEY] = (body, files)
        self.requests.append(record)
        resource = request.match_info.route.resource
        route_key = f"{request.method} {resource.canonical if resource else path}"
        bucket = hashlib.md5(route_key.encode()).hexdigest()
        try:
            response = await self._serve(request, handler, record, path, bucket)
        finally:
            self._notify()
        record.status = response.status
        return response

    async def _serve(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Any],
        record: RecordedRequest,
        path: str,
        bucket: str,
    ) -> web.StreamResponse:
        tokenless = re.match(r"/(webhooks/\d+/[^/]+|interactions/)", path) is not None
        if not tokenless and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._json_response({"message": "401: Unauthorized", "code": 0}, 401)
        injection = self._take_injection(request.method, path)
        if injection is not None:
            record.injected = True
            return self._injected_response(injection, bucket)
        headers = {
            "Via": "1.1 google", "X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "49",
            "X-RateLimit-Reset": f"{time.time() + 1:.3f}", "X-RateLimit-Reset-After": "1.000",
            "X-RateLimit-Bucket": bucket,
        }  # fmt: skip
        try:
            response = await handler(request)
        except ApiError as exc:
            return self._json_response(exc.body, exc.status, headers)
        except web.HTTPNotFound:
            self.unknown_routes.append(record)
            return self._json_response({"message": "404: Not Found", "code": 0}, 404, headers)
        except web.HTTPMethodNotAllowed:
            self.unknown_routes.append(record)
            return self._json_response(
                {"message": "405: Method Not Allowed", "code": 0}, 405, headers
            )
        response.headers.update(headers)
        return response

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[FakeFile]]:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            payload: Any = None
            files: list[tuple[int, FakeFile]] = []
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    match = re.fullmatch(r"files\[(\d+)\]", name)
                    index = int(match.group(1)) if match else len(files)
                    f = FakeFile(value.filename, value.file.read(), value.content_type)
                    files.append((index, f))
                elif name == "payload_json":
                    payload = json.loads(value if isinstance(value, str) else bytes(value).decode())
            return payload, [f for _, f in sorted(files, key=lambda t: t[0])]
        raw = await request.read()
        if not raw:
            return None, []
        try:
            return json.loads(raw), []
        except ValueError:
            return raw.decode(errors="replace"), []

    def _wrap(self, func: Callable[[_Call], Any]) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            body, files = request[_CALL_KEY]
            call = _Call(request, request.match_info, request.query, body, files)
            result = func(call)
            if asyncio.iscoroutine(result):
                result = await result
            if result is None:
                return web.Response(status=204)
            return self._json_response(result)

        return handler

    async def _download(self, request: web.Request) -> web.StreamResponse:
        att = self._attachments.get(int(request.match_info["attachment_id"]))
        if att is None or att.filename != request.match_info["filename"]:
            raise web.HTTPNotFound()
        return web.Response(
            body=att.data, content_type=att.content_type or "application/octet-stream"
        )

    def _routes(self) -> list[tuple[str, str, Callable[[_Call], Any]]]:
        wh_msg = "/webhooks/{webhook_id}/{token}/messages/{message_id}"
        return [
            ("GET", "/gateway", self._get_gateway),
            ("GET", "/gateway/bot", self._get_gateway),
            ("GET", "/users/@me", lambda c: self._me_payload()),
            ("GET", "/oauth2/applications/@me", self._get_application),
            ("GET", "/applications/@me", self._get_application),
            ("POST", "/users/@me/channels", self._open_dm),
            ("GET", "/users/{user_id}", self._get_user),
            ("GET", "/guilds/{guild_id}", self._get_guild),
            ("GET", "/guilds/{guild_id}/channels", self._get_guild_channels),
            ("GET", "/guilds/{guild_id}/roles", self._get_guild_roles),
            ("GET", "/guilds/{guild_id}/members/{user_id}", self._get_member),
            ("GET", "/guilds/{guild_id}/webhooks", self._get_guild_webhooks),
            ("GET", "/channels/{channel_id}", self._get_channel),
            ("GET", "/channels/{channel_id}/messages", self._get_messages),
            ("POST", "/channels/{channel_id}/messages", self._create_message),
            ("POST", "/channels/{channel_id}/messages/bulk-delete", self._bulk_delete),
            ("GET", "/channels/{channel_id}/messages/{message_id}", self._get_message),
            ("PATCH", "/channels/{channel_id}/messages/{message_id}", self._edit_message),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}", self._delete_message),
            ("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._put_reaction),
            ("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self._delete_reaction),
            ("POST", "/channels/{channel_id}/messages/{message_id}/threads", self._create_thread),
            ("POST", "/channels/{channel_id}/threads", self._create_thread),
            ("POST", "/channels/{channel_id}/typing", self._typing),
            ("POST", "/channels/{channel_id}/webhooks", self._create_channel_webhook),
            ("GET", "/channels/{channel_id}/webhooks", self._get_channel_webhooks),
            ("GET", "/applications/{app_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/commands", self._put_commands),
            ("POST", "/applications/{app_id}/commands", self._post_command),
            ("GET", "/applications/{app_id}/commands/{command_id}", self._get_command),
            ("PATCH", "/applications/{app_id}/commands/{command_id}", self._patch_command),
            ("DELETE", "/applications/{app_id}/commands/{command_id}", self._delete_command),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands", self._get_commands),
            ("PUT", "/applications/{app_id}/guilds/{guild_id}/commands", self._put_commands),
            ("POST", "/applications/{app_id}/guilds/{guild_id}/commands", self._post_command),
            ("GET", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}", self._get_command),
            ("PATCH", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}", self._patch_command),
            ("DELETE", "/applications/{app_id}/guilds/{guild_id}/commands/{command_id}", self._delete_command),
            ("POST", "/interactions/{interaction_id}/{token}/callback", self._interaction_callback),
            ("GET", "/webhooks/{webhook_id}", self._get_webhook),
            ("PATCH", "/webhooks/{webhook_id}", self._patch_webhook),
            ("DELETE", "/webhooks/{webhook_id}", self._delete_webhook_route),
            ("GET", "/webhooks/{webhook_id}/{token}", self._get_webhook),
            ("PATCH", "/webhooks/{webhook_id}/{token}", self._patch_webhook),
            ("DELETE", "/webhooks/{webhook_id}/{token}", self._delete_webhook_route),
            ("POST", "/webhooks/{webhook_id}/{token}", self._execute_webhook),
            ("GET", wh_msg, self._webhook_message),
            ("PATCH", wh_msg, self._webhook_message),
            ("DELETE", wh_msg, self._webhook_message),
        ]  # fmt: skip

    # ---- REST handlers: identity ----------------------------------------------------------

    def _me_payload(self) -> dict[str, Any]:
        return self.bot_user.to_payload() | {
            "verified": True, "mfa_enabled": False, "locale": "en-US", "email": None,
        }  # fmt: skip

    def _get_gateway(self, call: _Call) -> dict[str, Any]:
        return {
            "url": self.gateway_url, "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0,
                                    "max_concurrency": 1},
        }  # fmt: skip

    def _get_application(self, call: _Call) -> dict[str, Any]:
        return {
            "id": str(self.application_id), "name": self.bot_user.username, "icon": None,
            "description": "", "summary": "", "type": None, "bot_public": True,
            "bot_require_code_grant": False, "owner": self.owner.to_payload(), "team": None,
            "verify_key": "0" * 64, "flags": self.application_flags, "rpc_origins": [],
            "interactions_endpoint_url": None, "bot": self.bot_user.to_payload(),
            "tags": [], "redirect_uris": [], "approximate_guild_count": len(self.guilds),
        }  # fmt: skip

    def _get_user(self, call: _Call) -> dict[str, Any]:
        user = self.users.get(call.id("user_id", "User", 10013))
        if user is None:
            raise _not_found("User", 10013)
        return user.to_payload()

    def _open_dm(self, call: _Call) -> dict[str, Any]:
        uid = int(call.body.get("recipient_id", 0))
        if uid not in self.users:
            raise _not_found("User", 10013)
        return self.dm_channel(uid).to_payload()

    # ---- REST handlers: guilds and channels -----------------------------------------------

    def _guild_payload(self, guild: FakeGuild, *, full: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(guild.id), "name": guild.name, "icon": None, "owner_id": str(guild.owner_id),
            "roles": [r.to_payload() for r in guild.roles.values()], "emojis": [], "stickers": [],
            "features": [], "verification_level": 0, "default_message_notifications": 0,
            "explicit_content_filter": 0, "mfa_level": 0, "nsfw_level": 0, "premium_tier": 0,
            "premium_subscription_count": 0, "preferred_locale": "en-US", "afk_timeout": 300,
            "afk_channel_id": None, "system_channel_id": None, "system_channel_flags": 0,
            "rules_channel_id": None, "public_updates_channel_id": None,
            "safety_alerts_channel_id": None, "description": None, "banner": None, "splash": None,
            "discovery_splash": None, "vanity_url_code": None, "application_id": None,
            "max_members": 500000, "premium_progress_bar_enabled": False, "widget_enabled": False,
            "incidents_data": None,
        }  # fmt: skip
        if full:
            channels = [self.channels[c] for c in guild.channel_ids]
            data.update(
                joined_at=_iso(guild.joined_at), large=False, unavailable=False,
                member_count=len(guild.members),
                members=[m.to_payload() for m in guild.members.values()],
                channels=[c.to_payload() for c in channels if not c.is_thread],
                threads=[c.to_payload() for c in channels if c.is_thread and not c.archived],
                presences=[], voice_states=[], stage_instances=[], guild_scheduled_events=[],
                soundboard_sounds=[], embedded_activities=[],
            )  # fmt: skip
        return data

    def _guild(self, call: _Call) -> FakeGuild:
        guild = self.guilds.get(call.id("guild_id", "Guild", 10004))
        if guild is None:
            raise _not_found("Guild", 10004)
        return guild

    def _get_guild(self, call: _Call) -> dict[str, Any]:
        return self._guild_payload(self._guild(call), full=False)

    def _get_guild_channels(self, call: _Call) -> list[dict[str, Any]]:
        guild = self._guild(call)
        return [
            self.channels[c].to_payload()
            for c in guild.channel_ids
            if not self.channels[c].is_thread
        ]

    def _get_guild_roles(self, call: _Call) -> list[dict[str, Any]]:
        return [r.to_payload() for r in self._guild(call).roles.values()]

    def _get_member(self, call: _Call) -> dict[str, Any]:
        member = self._guild(call).members.get(call.id("user_id", "Member", 10007))
        if member is None:
            raise _not_found("Member", 10007)
        return member.to_payload()

    def _channel(self, call: _Call, *, view: bool = True) -> FakeChannel:
        channel = self.channels.get(call.id("channel_id"))
        if channel is None:
            raise _not_found("Channel", 10003)
        if (
            view
            and channel.guild_id is not None
            and not self.bot_permissions(channel.id) & VIEW_CHANNEL
        ):
            raise ApiError(403, "Missing Access", 50001)
        return channel

    def _require(self, channel: FakeChannel, *names: str) -> None:
        needed = permission_value(names)
        if self.bot_permissions(channel.id) & needed != needed:
            raise ApiError(*MISSING_PERMISSIONS)

    def _get_channel(self, call: _Call) -> dict[str, Any]:
        return self._channel(call).to_payload()

    def _typing(self, call: _Call) -> None:
        channel = self._channel(call)
        if channel.guild_id is not None:
            self._require(
                channel, "send_messages_in_threads" if channel.is_thread else "send_messages"
            )
        self.typing[channel.id] += 1

    # ---- REST handlers: messages ----------------------------------------------------------

    def _channel_message(self, call: _Call, channel: FakeChannel) -> FakeMessage:
        msg = self.messages.get(call.id("message_id", "Message", 10008))
        if msg is None or msg.deleted or msg.ephemeral or msg.channel_id != channel.id:
            raise _not_found("Message", 10008)
        return msg

    def _get_messages(self, call: _Call) -> list[dict[str, Any]]:
        channel = self._channel(call)
        self._require(channel, "read_message_history")
        limit = max(1, min(100, int(call.query.get("limit", 50))))
        msgs = self.channel_messages(channel.id)
        if "around" in call.query:
            around = int(call.query["around"])
            older = [m for m in msgs if m.id <= around][-((limit + 1) // 2) :]
            newer = [m for m in msgs if m.id > around][: limit - len(older)]
            picked = older + newer
        elif "after" in call.query:
            picked = [m for m in msgs if m.id > int(call.query["after"])][:limit]
        else:
            before = int(call.query.get("before", 1 << 63))
            picked = [m for m in msgs if m.id < before][-limit:]
        return [self._message_payload(m) for m in reversed(picked)]  # newest first, like Discord

    def _get_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        self._require(channel, "read_message_history")
        return self._message_payload(self._channel_message(call, channel))

    def _create_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        if channel.type == ChannelType.DM:
            if not channel.recipients[0].accepts_dms:
                raise ApiError(403, "Cannot send messages to this user", 50007)
        else:
            self._require(
                channel, "send_messages_in_threads" if channel.is_thread else "send_messages"
            )
            if call.files:
                self._require(channel, "attach_files")
        body = call.body
        ref_id: int | None = None
        reference = body.get("message_reference")
        if reference:
            ref_id = int(reference["message_id"])
            ref = self.messages.get(ref_id)
            if ref is None or ref.deleted or ref.ephemeral:
                if reference.get("fail_if_not_exists", True):
                    raise _form_error({"message_reference": _field_error(
                        "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")})  # fmt: skip
                ref_id = None
        msg = FakeMessage(
            id=self.snowflake(), channel_id=channel.id, guild_id=channel.guild_id,
            author=self.bot_user, type=19 if ref_id else 0, reference_id=ref_id,
        )  # fmt: skip
        self._apply_body(msg, body, call.files, creating=True)
        self._post(msg)
        return self._message_payload(msg)

    def _edit_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if msg.author.id != self.bot_user.id or msg.webhook_id is not None:
            if set(call.body) - {"flags"}:
                raise ApiError(403, "Cannot edit a message authored by another user", 50005)
            self._require(channel, "manage_messages")
        return self._edit(msg, call.body, call.files)

    def _delete_message(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if msg.author.id != self.bot_user.id:
            self._require(channel, "manage_messages")
        self._delete(msg)

    def _bulk_delete(self, call: _Call) -> None:
        channel = self._channel(call)
        self._require(channel, "manage_messages")
        ids = [int(i) for i in call.body.get("messages", [])]
        if not 2 <= len(ids) <= 100:
            raise _form_error({"messages": _bad_len(2, 100)})
        for mid in ids:
            msg = self.messages.get(mid)
            if msg is not None and msg.channel_id == channel.id and not msg.deleted:
                msg.deleted = True
        data: dict[str, Any] = {"ids": [str(i) for i in ids], "channel_id": str(channel.id)}
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        self._dispatch("MESSAGE_DELETE_BULK", data, Intent.GUILD_MESSAGES)

    def _put_reaction(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if channel.guild_id is not None:
            self._require(channel, "add_reactions", "read_message_history")
        self._react(msg, self.bot_user, call.params["emoji"], add=True)

    def _delete_reaction(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        self._react(msg, self.bot_user, call.params["emoji"], add=False)

    def _create_thread(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        assert channel.guild_id is not None
        private = call.body.get("type") == ChannelType.PRIVATE_THREAD
        self._require(channel, "create_private_threads" if private else "create_public_threads")
        name = str(call.body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _form_error({"name": _bad_len(1, 100)})
        if "message_id" in call.params:
            self._channel_message(call, channel)
        thread = self.add_thread(channel.id, name, private=private, owner=self.bot_user)
        return thread.to_payload()

    # ---- REST handlers: application commands ----------------------------------------------

    def _command_scope(self, call: _Call) -> int | None:
        if call.params.get("app_id") != str(self.application_id):
            raise ApiError(403, "Missing Access", 50001)
        if "guild_id" in call.params:
            return self._guild(call).id
        return None

    def _normalise_command(
        self, definition: dict[str, Any], scope: int | None, existing: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Validate like Discord does and fill in the fields it adds (id, version...)."""
        kind = definition.get("type", 1)
        name = str(definition.get("name", ""))
        errors: dict[str, Any] = {}
        if kind == 1:
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
                errors["name"] = _field_error(
                    "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if not 1 <= len(definition.get("description") or "") <= 100:
                errors["description"] = _bad_len(1, 100)
        elif not 1 <= len(name) <= 32:
            errors["name"] = _bad_len(1, 32)
        problems = self._check_options(definition.get("options") or [])
        if problems:
            errors["options"] = problems
        if errors:
            raise _form_error(errors)
        previous = next(
            (c for c in existing if c["name"] == name and c.get("type", 1) == kind), None
        )
        cmd = {
            "type": kind, "description": "", "options": [], "default_member_permissions": None,
            "dm_permission": True, "nsfw": False, "integration_types": [0], "contexts": None,
            "name_localizations": None, "description_localizations": None,
        } | copy.deepcopy(definition)  # fmt: skip
        cmd.update(
            id=previous["id"] if previous else str(self.snowflake()),
            application_id=str(self.application_id),
            version=str(self.snowflake()),
        )
        if scope is not None:
            cmd["guild_id"] = str(scope)
        return cmd

    def _check_options(self, options: list[dict[str, Any]]) -> dict[str, Any]:
        errors: dict[str, Any] = {}
        if len(options) > 25:
            errors.update(_max_len(25))
        seen_optional = False
        for index, opt in enumerate(options):
            problems: dict[str, Any] = {}
            if opt.get("type") not in _OPTION_TYPES:
                problems["type"] = _field_error(
                    "BASE_TYPE_CHOICES", "Value must be one of option types."
                )
            name = str(opt.get("name", ""))
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
                problems["name"] = _field_error(
                    "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if not 1 <= len(opt.get("description") or "") <= 100:
                problems["description"] = _bad_len(1, 100)
            if opt.get("required") and seen_optional:
                problems["required"] = _field_error(
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", "Required options must be placed before non-required options"
                )  # fmt: skip
            seen_optional = seen_optional or (
                opt.get("type") not in (1, 2) and not opt.get("required")
            )
            if len(opt.get("choices") or []) > 25:
                problems["choices"] = _max_len(25)
            nested = self._check_options(opt.get("options") or [])
            if nested:
                problems["options"] = nested
            if problems:
                errors[str(index)] = problems
        return errors

    def _get_commands(self, call: _Call) -> list[dict[str, Any]]:
        return copy.deepcopy(self._commands.get(self._command_scope(call), []))

    def _put_commands(self, call: _Call) -> list[dict[str, Any]]:
        scope = self._command_scope(call)
        existing = self._commands.get(scope, [])
        definitions = call.json if isinstance(call.json, list) else []
        if len(definitions) > 100:
            raise _form_error(_max_len(100))
        commands = []
        for index, definition in enumerate(definitions):
            try:
                commands.append(self._normalise_command(definition, scope, existing))
            except ApiError as exc:
                raise _form_error({str(index): exc.body["errors"]}) from None
        self._commands[scope] = commands
        return copy.deepcopy(commands)

    def _post_command(self, call: _Call) -> dict[str, Any]:
        scope = self._command_scope(call)
        existing = self._commands.setdefault(scope, [])
        cmd = self._normalise_command(call.body, scope, existing)
        existing[:] = [c for c in existing if c["id"] != cmd["id"]] + [cmd]
        return copy.deepcopy(cmd)

    def _command_by_id(self, call: _Call) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        commands = self._commands.get(self._command_scope(call), [])
        for cmd in commands:
            if cmd["id"] == call.params["command_id"]:
                return commands, cmd
        raise _not_found("application command", 10063)

    def _get_command(self, call: _Call) -> dict[str, Any]:
        return copy.deepcopy(self._command_by_id(call)[1])

    def _patch_command(self, call: _Call) -> dict[str, Any]:
        commands, cmd = self._command_by_id(call)
        merged = {
            k: v for k, v in cmd.items() if k not in ("id", "version", "application_id", "guild_id")
        }
        updated = self._normalise_command(merged | call.body, self._command_scope(call), [cmd])
        updated["id"] = cmd["id"]
        commands[commands.index(cmd)] = updated
        return copy.deepcopy(updated)

    def _delete_command(self, call: _Call) -> None:
        commands, cmd = self._command_by_id(call)
        commands.remove(cmd)

    # ---- REST handlers: interactions ------------------------------------------------------

    def _interaction_message(
        self,
        handle: InteractionHandle,
        body: dict[str, Any],
        files: list[FakeFile],
        *,
        loading: bool = False,
    ) -> FakeMessage:
        flags = int(body.get("flags") or 0) & MessageFlag.EPHEMERAL
        meta = {
            "id": str(handle.id), "type": handle.type, "user": handle.user.to_payload(),
            "authorizing_integration_owners": handle.payload.get("authorizing_integration_owners", {}),
        }  # fmt: skip
        if handle.command_name:
            meta["name"] = handle.command_name
        is_original = handle.response is None
        msg = FakeMessage(
            id=self.snowflake(), channel_id=handle.channel_id, guild_id=handle.guild_id,
            author=self.bot_user, webhook_id=self.application_id, application_id=self.application_id,
            type=20 if is_original and handle.type == 2 else 0, flags=flags, interaction_metadata=meta,
        )  # fmt: skip
        if loading:
            msg.flags |= MessageFlag.LOADING
        else:
            self._apply_body(msg, body, files, creating=True)
        return msg

    def _interaction_callback(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interactions.get(call.id("interaction_id", "interaction", 10062))
        if handle is None or handle.token != call.params["token"]:
            raise _not_found("interaction", 10062)
        if handle.response is not None:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        if asyncio.get_running_loop().time() > handle.deadline:
            handle.expired = True
            raise _not_found("interaction", 10062)
        body = call.body
        kind = body.get("type")
        data = body.get("data") or {}
        if kind not in _ALLOWED_CALLBACKS.get(handle.type, set()):
            raise _form_error({"type": _field_error("INTERACTION_RESPONSE_TYPE_INVALID",
                                                    f"Invalid response type {kind} for interaction type {handle.type}")})  # fmt: skip
        message: FakeMessage | None = None
        if kind == 4:
            message = self._interaction_message(handle, data, call.files)
        elif kind == 5:
            message = self._interaction_message(handle, data, [], loading=True)
        elif kind == 6:
            handle.original = handle.component_message
        elif kind == 7:
            if handle.component_message is None:
                raise ApiError(400, "Unknown message", 10008)
            self._edit(handle.component_message, data, call.files)
            handle.original = message = handle.component_message
        elif kind == 8:
            if len(data.get("choices") or []) > 25:
                raise _form_error({"data": {"choices": _max_len(25)}})
        elif kind == 9:
            errors = {k: _field_error("BASE_TYPE_REQUIRED", "This field is required")
                      for k in ("custom_id", "title", "components") if not data.get(k)}  # fmt: skip
            if errors:
                raise _form_error({"data": errors})
        handle.response = InteractionResponse(
            type=kind, data=copy.deepcopy(data), files=list(call.files)
        )
        if kind in (4, 5):
            assert message is not None
            handle.original = message
            self._post(message)
        self._notify()
        if not _bool_query(call.query.get("with_response")):
            return None
        result: dict[str, Any] = {"interaction": {"id": str(handle.id), "type": handle.type}}
        result["resource"] = {"type": kind}
        if message is not None:
            result["interaction"].update(
                response_message_id=str(message.id), response_message_loading=kind == 5,
                response_message_ephemeral=message.ephemeral,
            )  # fmt: skip
            result["resource"]["message"] = self._message_payload(message)
        return result

    # ---- REST handlers: webhooks ----------------------------------------------------------

    def _create_webhook(
        self,
        channel: FakeChannel,
        name: str,
        creator: FakeUser,
        application_id: int | None,
        avatar: str | None = None,
    ) -> FakeWebhook:
        hook = FakeWebhook(
            id=self.snowflake(), token=secrets.token_urlsafe(48), channel_id=channel.id,
            guild_id=channel.guild_id, name=name, creator=creator, avatar=avatar,
            application_id=application_id,
        )  # fmt: skip
        self.webhooks[hook.id] = hook
        self._dispatch(
            "WEBHOOKS_UPDATE",
            {"guild_id": _opt_str(channel.guild_id), "channel_id": str(channel.id)},
            Intent.GUILD_WEBHOOKS,
        )
        return hook

    @staticmethod
    def _check_webhook_name(name: str, key: str = "name") -> None:
        lowered = name.lower()
        if not 1 <= len(name) <= 80:
            raise _form_error({key: _bad_len(1, 80)})
        if "discord" in lowered or "clyde" in lowered:
            raise _form_error(
                {
                    key: _field_error(
                        "USERNAME_INVALID_CONTAINS", 'Username cannot contain "discord"'
                    )
                }
            )

    def _create_channel_webhook(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        if channel.guild_id is None or channel.is_thread:
            raise ApiError(400, "Cannot execute action on this channel type", 50024)
        self._require(channel, "manage_webhooks")
        name = str(call.body.get("name") or "")
        self._check_webhook_name(name)
        if sum(1 for h in self.webhooks.values() if h.channel_id == channel.id) >= 15:
            raise ApiError(400, "Maximum number of webhooks reached (15)", 30007)
        avatar = call.body.get("avatar")
        hook = self._create_webhook(
            channel, name, self.bot_user, self.application_id,
            hashlib.md5(avatar.encode()).hexdigest() if avatar else None,
        )  # fmt: skip
        return hook.to_payload()

    def _get_channel_webhooks(self, call: _Call) -> list[dict[str, Any]]:
        channel = self._channel(call)
        self._require(channel, "manage_webhooks")
        return [h.to_payload() for h in self.webhooks.values() if h.channel_id == channel.id]

    def _get_guild_webhooks(self, call: _Call) -> list[dict[str, Any]]:
        guild = self._guild(call)
        if not self.compute_permissions(guild.id, self.bot_user.id) & MANAGE_WEBHOOKS:
            raise ApiError(*MISSING_PERMISSIONS)
        return [h.to_payload() for h in self.webhooks.values() if h.guild_id == guild.id]

    def _webhook(self, call: _Call) -> FakeWebhook:
        """The webhook of the path, authorised either by its token or by the bot's token."""
        hook = self.webhooks.get(call.id("webhook_id", "Webhook", 10015))
        if hook is None or ("token" in call.params and call.params["token"] != hook.token):
            raise _not_found("Webhook", 10015)
        if "token" not in call.params and hook.channel_id in self.channels:
            self._require(self.channels[hook.channel_id], "manage_webhooks")
        return hook

    def _get_webhook(self, call: _Call) -> dict[str, Any]:
        hook = self._webhook(call)
        payload = hook.to_payload()
        if "token" in call.params:
            payload.pop("user", None)  # Discord omits the creator when fetched by token
        return payload

    def _patch_webhook(self, call: _Call) -> dict[str, Any]:
        hook = self._webhook(call)
        if "name" in call.body:
            self._check_webhook_name(str(call.body["name"] or ""))
            hook.name = call.body["name"]
        if "avatar" in call.body:
            avatar = call.body["avatar"]
            hook.avatar = hashlib.md5(avatar.encode()).hexdigest() if avatar else None
        if "channel_id" in call.body and "token" not in call.params:
            hook.channel_id = int(call.body["channel_id"])
        return hook.to_payload()

    def _delete_webhook_route(self, call: _Call) -> None:
        self.delete_webhook(self._webhook(call).id)

    def _interaction_for_token(self, call: _Call) -> InteractionHandle | None:
        if call.params.get("webhook_id") != str(self.application_id):
            return None
        return next(
            (h for h in self._interactions.values() if h.token == call.params["token"]), None
        )

    def _execute_webhook(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interaction_for_token(call)
        if handle is not None:  # an interaction follow-up
            if handle.response is None:
                raise _not_found("Webhook", 10015)
            if handle.original is not None and handle.original.loading:
                # Discord: the first follow-up after a "thinking" defer *replaces* the
                # placeholder (and keeps its ephemerality, whatever flags the follow-up has)
                return self._edit(handle.original, call.body, call.files)
            msg = self._interaction_message(handle, call.body, call.files)
            handle.followups.append(msg)
            self._post(msg)
            return self._message_payload(msg)
        hook = self._webhook(call)
        channel = self.channels[hook.channel_id]
        if "thread_id" in call.query:
            thread = self.channels.get(int(call.query["thread_id"]))
            if thread is None or thread.parent_id != hook.channel_id:
                raise _not_found("Channel", 10003)
            channel = thread
        body = call.body
        username = body.get("username") or None
        if username is not None:
            self._check_webhook_name(str(username), "username")
        author = FakeUser(id=hook.id, username=username or hook.name, bot=True, avatar=hook.avatar)
        msg = FakeMessage(
            id=self.snowflake(), channel_id=channel.id, guild_id=channel.guild_id, author=author,
            webhook_id=hook.id, application_id=hook.application_id,
            username=username or hook.name, avatar_url=body.get("avatar_url"),
        )  # fmt: skip
        self._apply_body(msg, body, call.files, creating=True)
        self._post(msg)
        if not _bool_query(call.query.get("wait")):
            return None
        return self._message_payload(msg)

    def _webhook_message(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interaction_for_token(call)
        mid = call.params["message_id"]
        msg: FakeMessage | None
        if handle is not None:
            if mid == "@original":
                msg = handle.original
            else:
                msg = next((m for m in handle.messages if str(m.id) == mid), None)
        else:
            hook = self._webhook(call)
            msg = self.messages.get(int(mid)) if mid.isdigit() else None
            if msg is not None and msg.webhook_id != hook.id:
                msg = None
        if msg is None or msg.deleted:
            raise _not_found("Message", 10008)
        method = call.request.method
        if method == "GET":
            return self._message_payload(msg)
        if method == "DELETE":
            self._delete(msg)
            return None
        return self._edit(msg, call.body, call.files)


# --------------------------------------------------------------------------------------------
# fixtures / helpers for tests
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_fake(**kwargs: Any) -> AsyncIterator[FakeDiscord]:
    """Start a :class:`FakeDiscord` and point discord.py at it for the duration.

    Redirects ``Route.BASE`` (REST + webhooks) and ``DiscordWebSocket.DEFAULT_GATEWAY`` (first
    gateway connection; see the module docstring), restoring both afterwards."""
    fake = FakeDiscord(**kwargs)
    await fake.start()
    old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = fake.api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    try:
        yield fake
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old_base, old_gateway
        await fake.stop()


async def start_client(
    client: discord.Client, fake: FakeDiscord, token: str | None = None, *, timeout: float = 10.0
) -> asyncio.Task[None]:
    """Log ``client`` in to the fake and run ``client.connect()`` in a task until on_ready.

    Returns the task; pass it to :func:`stop_client`.  Build clients with a small
    ``guild_ready_timeout`` (e.g. 0.05): discord.py waits that long after the last
    GUILD_CREATE before firing on_ready (default 2 s)."""
    try:
        await client.login(token or fake.token)
    except BaseException:
        await client.close()  # login leaves discord.py's HTTP session open
        raise
    task = asyncio.get_running_loop().create_task(
        client.connect(reconnect=True), name="fake-discord-client"
    )
    ready = asyncio.ensure_future(client.wait_until_ready())
    done, _ = await asyncio.wait(
        {task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if ready not in done:
        ready.cancel()
        if task in done:
            await client.close()
            task.result()  # raise what connect() raised
            raise RuntimeError("client.connect() returned before READY")
        await stop_client(client, task)
        raise TimeoutError(f"client not ready after {timeout}s")
    return task


async def stop_client(client: discord.Client, task: asyncio.Task[None] | None = None) -> None:
    """Close the client and wait for its connect() task to finish."""
    await client.close()
    if task is not None:
        try:
            await asyncio.wait_for(task, 5.0)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def connected_client(
    client: discord.Client, fake: FakeDiscord, token: str | None = None, *, timeout: float = 10.0
) -> AsyncIterator[discord.Client]:
    """``async with connected_client(client, fake):`` — ready on entry, closed on exit."""
    task = await start_client(client, fake, token, timeout=timeout)
    try:
        yield client
    finally:
        await stop_client(client, task)


__all__ = [
    "ALL_PERMISSIONS", "DEFAULT_BOT_PERMISSIONS", "DEFAULT_EVERYONE_PERMISSIONS", "ApiError",
    "ChannelType", "FakeAttachment", "FakeChannel", "FakeDiscord", "FakeFile", "FakeGuild",
    "FakeMember", "FakeMessage", "FakeRole", "FakeUser", "FakeWebhook", "Injection", "Intent",
    "InteractionHandle", "InteractionResponse", "MessageFlag", "RecordedRequest",
    "connected_client", "permission_value", "running_fake", "start_client", "stop_client",
]  # fmt: skip
