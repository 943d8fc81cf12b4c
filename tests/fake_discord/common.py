"""Discord's protocol constants, permission arithmetic, snowflakes and error shapes.

Shared by every part of the fake: intents, message flags, channel types, the default
permission sets, and the JSON error bodies Discord answers with (``ApiError``).
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterable
from datetime import UTC, datetime
from typing import Any

import discord

API_PREFIX = "/api/v10"
DISCORD_EPOCH = 1420070400000
MAX_CONTENT_LENGTH = 2000
MAX_EMBED_DESCRIPTION = 4096
DEFAULT_TOKEN = "fake-bot-token"
#: How long a test waits for something that should happen (a reply, a callback, a
#: reconnect).  Generous on purpose: waits are event-driven, so this is only ever spent
#: when a test is failing anyway, and a busy 2-core CI machine must never turn a slow
#: but correct bot into a failure.
PATIENCE = 60.0


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


class _Snowflakes:
    """Time-based, strictly increasing ids, so ``before``/``after`` history paging is ordered."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        now = (int(time.time() * 1000) - DISCORD_EPOCH) << 22
        self._last = max(self._last + 1, now)
        return self._last

    def at(self, when: datetime, taken: Container[int]) -> int:
        """An id whose timestamp is ``when`` (for messages "sent" in the past), not in ``taken``."""
        ident = (int(when.timestamp() * 1000) - DISCORD_EPOCH) << 22
        while ident in taken:
            ident += 1
        return ident


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

#: (method, path pattern) of the REST routes tests most often break with ``FakeDiscord.inject``:
#: ``fake.inject(*EDIT_MESSAGE, 503, times=2)``.  Patterns are relative to /api/v10; ``{name}``
#: matches one path segment (put a real id in its place to target one channel or message).
SEND_MESSAGE = ("POST", "/channels/{channel_id}/messages")
EDIT_MESSAGE = ("PATCH", "/channels/{channel_id}/messages/{message_id}")
DELETE_MESSAGE = ("DELETE", "/channels/{channel_id}/messages/{message_id}")
GET_MESSAGES = ("GET", "/channels/{channel_id}/messages")
EXECUTE_WEBHOOK = ("POST", "/webhooks/{webhook_id}/{token}")
EDIT_WEBHOOK_MESSAGE = ("PATCH", "/webhooks/{webhook_id}/{token}/messages/{message_id}")
