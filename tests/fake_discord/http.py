"""The REST half's plumbing: the aiohttp middleware (auth, rate-limit headers, recorded
requests, failure injection), body parsing (JSON and multipart), the route table,
attachment downloads, and the identity/guild/channel handlers.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import math
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_discord.common import (
    API_PREFIX,
    MISSING_PERMISSIONS,
    VIEW_CHANNEL,
    ApiError,
    _iso,
    _not_found,
    permission_value,
)
from tests.fake_discord.models import (
    FakeAttachment,
    FakeChannel,
    FakeFile,
    FakeGuild,
    Injection,
    RecordedRequest,
    RequestHook,
    _Call,
)

_PLACEHOLDER = re.compile(r"\{[A-Za-z_]\w*\}")
# where the middleware leaves the parsed body for the route handler
_CALL_KEY: Any = web.RequestKey("fake_call", tuple) if hasattr(web, "RequestKey") else "fake_call"


class HttpMixin:
    """REST plumbing, failure injection and identity/guild/channel routes; mixed into
    :class:`FakeDiscord`."""

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
        after: int = 0,
        global_: bool = False,
        body: dict[str, Any] | None = None,
        drop: str | None = None,
    ) -> Injection:
        """Make the next ``times`` matching REST calls fail with ``status``.

        ``method`` may be "*"; ``path_pattern`` is a regex fullmatched against the path after
        /api/v10, where ``{name}`` placeholders match one segment, e.g.
        ``"/channels/{channel_id}/messages/{message_id}"`` (see ``SEND_MESSAGE`` & co. in
        ``common``).  ``after=n`` lets the first ``n`` matching calls through first (fail
        the third edit of a stream: ``after=2``).  The failed call changes nothing.

        A 429 carries Discord's body and headers (``Via`` included: without it discord.py
        takes a 429 for a Cloudflare ban).  discord.py's bot HTTP client retries 500, 502,
        504 and 524 itself (sleeping 1 s, 3 s, 5 s...) but raises ``DiscordServerError`` on
        a 503 at once; its webhook adapter retries every status >= 500 the same way.

        ``drop="reset"`` answers nothing and resets the TCP connection (the client sees
        ``aiohttp.ClientOSError`` errno 104 ECONNRESET, which discord.py does not retry on
        Linux); ``drop="close"`` closes it cleanly (``aiohttp.ServerDisconnectedError``).
        aiohttp retries an idempotent call (GET, PUT, DELETE) once by itself after a drop,
        so it takes ``times=2`` for the caller to see one there; POST and PATCH fail at once.
        Attachment downloads match too: see :meth:`inject_download`."""
        if drop not in (None, "reset", "close"):
            raise ValueError(f"drop must be None, 'reset' or 'close', not {drop!r}")
        injection = Injection(
            method.upper(),
            self._compile_path(path_pattern),
            status,
            retry_after,
            times,
            global_,
            body,
            skip=after,
            drop=drop,
        )
        self.injections.append(injection)
        return injection

    def inject_download(
        self,
        attachment: FakeAttachment,
        status: int = 404,
        *,
        times: int = 1,
        after: int = 0,
        drop: str | None = None,
    ) -> Injection:
        """Make the next ``times`` downloads of ``attachment`` (its ``url`` or ``proxy_url``)
        fail with ``status`` (404 and 403 become discord.py's ``NotFound``/``Forbidden``,
        others ``HTTPException``) or a dropped connection, as :meth:`inject`."""
        path = rf"(/media)?/attachments/\d+/{attachment.id}/[^/]+"
        return self.inject("GET", path, status, times=times, after=after, drop=drop)

    def on_request(
        self,
        method: str,
        path_pattern: str,
        action: Callable[[RecordedRequest], Any],
        *,
        times: int = 1,
        after: int = 0,
    ) -> RequestHook:
        """Run ``action(recorded_request)`` (awaited when it returns an awaitable) just before
        the route handles each of the next ``times`` matching REST calls (attachment downloads
        too, by their path), after letting ``after`` of them pass.  Patterns as in
        :meth:`inject`.  Deterministic staging of
        races, e.g. the user deletes a message while the bot is posting its reply::

            fake.on_request(*SEND_MESSAGE, lambda r: fake.delete_message(question))
        """
        hook = RequestHook(
            method.upper(), self._compile_path(path_pattern), action, times, skip=after
        )
        self.request_hooks.append(hook)
        return hook

    def _take_injection(self, method: str, path: str) -> Injection | None:
        for inj in self.injections:
            if inj.remaining > 0 and inj.method in ("*", method) and inj.pattern.fullmatch(path):
                if inj.skip > 0:
                    inj.skip -= 1
                    continue
                inj.remaining -= 1
                inj.hits += 1
                return inj
        return None

    async def _run_hooks(self, method: str, path: str, record: RecordedRequest) -> None:
        for hook in list(self.request_hooks):
            if hook.remaining <= 0 or hook.method not in ("*", method):
                continue
            if not hook.pattern.fullmatch(path):
                continue
            if hook.skip > 0:
                hook.skip -= 1
                continue
            hook.remaining -= 1
            hook.hits += 1
            result = hook.action(record)
            if inspect.isawaitable(result):
                await result

    @staticmethod
    def _drop_connection(request: web.Request, how: str) -> web.Response:
        """Leave the call unanswered: RST (``how == "reset"``) or FIN the TCP connection."""
        transport = request.transport
        if transport is not None:
            if how == "reset":
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return web.Response(status=499)  # never reaches the client

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
        record.status = 0 if record.injected and response.status == 499 else response.status
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
            if injection.drop is not None:
                return self._drop_connection(request, injection.drop)
            return self._injected_response(injection, bucket)
        await self._run_hooks(request.method, path, record)
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
        """Serve an attachment at its ``url`` (``/attachments/...``) or ``proxy_url``
        (``/media/attachments/...``); the CDN's ``ex``/``is``/``hm`` query is ignored."""
        record = RecordedRequest(
            method=request.method, path=request.path, query=dict(request.query), json=None,
            files=[], headers=dict(request.headers),
        )  # fmt: skip
        self.downloads.append(record)
        try:
            injection = self._take_injection(request.method, request.path)
            if injection is not None:
                record.injected = True
                if injection.drop is not None:
                    return self._drop_connection(request, injection.drop)
                reason = web.Response(status=injection.status).reason
                response = web.Response(
                    status=injection.status, text=f"{injection.status}: {reason}"
                )
            else:
                await self._run_hooks(request.method, request.path, record)
                response = self._attachment_response(request)
            record.status = response.status
            return response
        finally:
            self._notify()

    def _attachment_response(self, request: web.Request) -> web.Response:
        try:
            att = self._attachments.get(int(request.match_info["attachment_id"]))
        except ValueError:
            att = None
        if att is None or att.filename != request.match_info["filename"]:
            return web.Response(status=404, text="404: Not Found")
        # the header verbatim: aiohttp's content_type= refuses "text/plain; charset=utf-8"
        content_type = att.content_type or "application/octet-stream"
        return web.Response(body=att.data, headers={"Content-Type": content_type})

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
