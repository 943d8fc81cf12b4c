"""``FakeDiscord`` itself: its state, server lifecycle and ``wait_for``, assembled from
the mixins that hold each part of the protocol (gateway, REST, messages, commands,
webhooks, world building).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_discord.commands import CommandsMixin
from tests.fake_discord.common import API_PREFIX, DEFAULT_TOKEN, PATIENCE, Intent, _Snowflakes
from tests.fake_discord.gateway import GatewayMixin, _GatewayConnection, _Session
from tests.fake_discord.http import HttpMixin
from tests.fake_discord.messages import MessagesMixin
from tests.fake_discord.models import (
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeMessage,
    FakeUser,
    FakeWebhook,
    Injection,
    InteractionHandle,
    RecordedRequest,
    RequestHook,
)
from tests.fake_discord.state import StateMixin
from tests.fake_discord.webhooks import WebhooksMixin


class FakeDiscord(GatewayMixin, HttpMixin, StateMixin, MessagesMixin, CommandsMixin, WebhooksMixin):
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
        self.request_hooks: list[RequestHook] = []
        #: every attachment download (GET of an attachment's url/proxy_url), in arrival order.
        self.downloads: list[RecordedRequest] = []
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeat_count = 0
        #: (path, query) of each gateway websocket opened.
        self.gateway_connections: list[tuple[str, dict[str, str]]] = []

        self._sessions: dict[str, _Session] = {}
        #: IDENTIFY/RESUME payloads held while the gateway is paused (see pause_gateway).
        self._held: list[tuple[_GatewayConnection, dict[str, Any]]] = []
        self._gateway_paused = False
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
        app.router.add_get(
            "/media/attachments/{channel_id}/{attachment_id}/{filename}", self._download
        )
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
        self, predicate: Callable[[], Any], timeout: float = PATIENCE, *, message: str | None = None
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

    async def wait_connected(self, timeout: float = PATIENCE) -> None:
        """Wait until some session has a live, identified (or resumed) websocket."""
        await self.wait_for(
            lambda: any(s.connection and not s.invalid for s in self._sessions.values()),
            timeout,
            message="a connected gateway session",
        )
