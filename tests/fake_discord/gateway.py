"""The gateway half of the fake: websocket connections (zlib/zstd transport compression),
sessions with sequence numbers and replay buffers, IDENTIFY/RESUME/heartbeats, event
dispatch by intent, and test-driven disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_discord.common import PATIENCE, Intent

log = logging.getLogger(__name__)


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

    async def drain(self, timeout: float = PATIENCE) -> None:
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


class GatewayMixin:
    """Gateway sessions and event dispatch; mixed into :class:`FakeDiscord`."""

    # ---- gateway --------------------------------------------------------------------------

    def _dispatch(
        self,
        event: str,
        data: dict[str, Any] | Callable[[_Session | None], dict[str, Any]],
        intents: int = 0,
    ) -> int:
        """Send a dispatch to every live session whose intents cover it (a session awaiting a
        RESUME only buffers it); return how many were written to a connected websocket."""
        self.dispatched.append((event, data(None) if callable(data) else data))
        sent = 0
        for session in [s for s in self._sessions.values() if not s.invalid]:
            if intents and not session.intents & intents:
                continue
            sent += session.connection is not None
            self._send_dispatch(session, event, data(session) if callable(data) else data)
        self._notify()
        return sent

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
        elif op in (2, 6) and self._gateway_paused:
            self._held.append((conn, payload))
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

    @property
    def connected(self) -> bool:
        """Whether some bot session has a live, identified (or resumed) websocket now."""
        return any(s.connection and not s.invalid for s in self._sessions.values())

    async def wait_disconnected(self, timeout: float = PATIENCE) -> None:
        """Wait until no bot session has a live websocket (the bot stopped or was dropped)."""
        await self.wait_for(lambda: not self.connected, timeout, message="no connected session")

    def pause_gateway(self) -> None:
        """Hold every IDENTIFY and RESUME that arrives from now on, unanswered, until
        :meth:`resume_gateway`: the bot stays offline while the test posts what it should
        miss.  Websockets still open and heartbeats are still acknowledged."""
        self._gateway_paused = True

    @property
    def pending_handshakes(self) -> int:
        """IDENTIFY/RESUME payloads held by :meth:`pause_gateway`, not yet answered."""
        return len(self._held)

    def resume_gateway(self) -> None:
        """Answer the held IDENTIFY/RESUME payloads in arrival order (skipping those whose
        websocket went away) and stop holding new ones."""
        self._gateway_paused = False
        held, self._held = self._held, []
        for conn, payload in held:
            if conn in self._connections and not conn.ws.closed:
                self._on_gateway_payload(conn, payload)

    def expire_sessions(self) -> None:
        """Forget every session, as Discord does some time after a bot went away: a later
        RESUME gets INVALID_SESSION and the bot must IDENTIFY for a fresh READY.  Live
        websockets are closed with 4009 (session timed out), which discord.py answers by
        reconnecting and trying to RESUME."""
        for session in list(self._sessions.values()):
            conn = session.connection
            session.connection = None
            self._end_session(session)
            if conn is not None:
                conn.close(4009)

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
