"""A protocol-level fake of Discord's gateway and REST API, for tests.

Why: the bot's tests must exercise the *real*, unmodified discord.py client (its gateway
state machine, rate-limit handling, interaction plumbing, webhook adapter) rather than
mocks of it.  So this package runs an aiohttp server on 127.0.0.1 that speaks Discord's wire
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

Faults and races a test can stage (all deterministic, no sleeps): ``inject`` (any status,
429 included, or a dropped connection, on the next calls of a route, optionally after some
pass), ``inject_download`` (attachment downloads), ``on_request`` (run an action just
before a route handles a call, e.g. delete the message being replied to), ``pause_gateway``
/ ``resume_gateway`` / ``expire_sessions`` / ``disconnect_gateway`` (keep the bot offline,
force a fresh READY), ``user_message(..., at=...)`` (backdated history).

Layout (one module per part of the protocol; ``FakeDiscord`` is assembled from mixins):

- ``common``: protocol constants, permission arithmetic, snowflakes, error bodies;
- ``models``: the state dataclasses and what tests inspect (requests, interaction handles);
- ``gateway``: websocket connections, sessions, IDENTIFY/RESUME, dispatch;
- ``http``: the aiohttp server's REST plumbing, failure injection, identity/guild routes;
- ``messages``: user-side events and the REST message routes;
- ``commands``: application commands and interactions;
- ``webhooks``: webhook routes;
- ``state``: world building, permissions and accessors;
- ``core``: ``FakeDiscord`` (state, lifecycle, ``wait_for``);
- ``client``: ``running_fake`` and the helpers that run a real client against it.
"""

from __future__ import annotations

from tests.fake_discord.client import connected_client, running_fake, start_client, stop_client
from tests.fake_discord.common import (
    ALL_PERMISSIONS,
    API_PREFIX,
    DEFAULT_BOT_PERMISSIONS,
    DEFAULT_EVERYONE_PERMISSIONS,
    DEFAULT_TOKEN,
    DELETE_MESSAGE,
    EDIT_MESSAGE,
    EDIT_WEBHOOK_MESSAGE,
    EXECUTE_WEBHOOK,
    GET_MESSAGES,
    MAX_CONTENT_LENGTH,
    MAX_EMBED_DESCRIPTION,
    PATIENCE,
    SEND_MESSAGE,
    ApiError,
    ChannelType,
    Intent,
    MessageFlag,
    permission_value,
    snowflake_time,
)
from tests.fake_discord.core import FakeDiscord
from tests.fake_discord.models import (
    FakeAttachment,
    FakeChannel,
    FakeFile,
    FakeGuild,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    FakeWebhook,
    Injection,
    InteractionHandle,
    InteractionResponse,
    RecordedRequest,
    RequestHook,
    UserLike,
)

__all__ = [
    "ALL_PERMISSIONS",
    "API_PREFIX",
    "ApiError",
    "ChannelType",
    "DEFAULT_BOT_PERMISSIONS",
    "DEFAULT_EVERYONE_PERMISSIONS",
    "DEFAULT_TOKEN",
    "RequestHook",
    "SEND_MESSAGE",
    "GET_MESSAGES",
    "EXECUTE_WEBHOOK",
    "EDIT_WEBHOOK_MESSAGE",
    "EDIT_MESSAGE",
    "DELETE_MESSAGE",
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeFile",
    "FakeGuild",
    "FakeMember",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "FakeWebhook",
    "Injection",
    "Intent",
    "InteractionHandle",
    "InteractionResponse",
    "MAX_CONTENT_LENGTH",
    "MAX_EMBED_DESCRIPTION",
    "MessageFlag",
    "PATIENCE",
    "RecordedRequest",
    "UserLike",
    "connected_client",
    "permission_value",
    "running_fake",
    "snowflake_time",
    "start_client",
    "stop_client",
]
