"""`hermes-bot run` as a user starts it: `run_bot(settings)` against the fake Discord.

The fake runs on its own event loop in a background thread, so `run_bot` can own the main
thread's loop and its SIGINT/SIGTERM handlers exactly as in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.discord.client import run_bot
from tests.bot_harness import bot_settings
from tests.fake_discord import FakeDiscord, running_fake

pytestmark = pytest.mark.slow


class FakeInThread:
    """A running fake on a background loop; `call(coro)` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.stop = asyncio.Event()
        self.fake: FakeDiscord | None = None
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self._main(),), daemon=True
        )

    async def _main(self) -> None:
        self.stop = asyncio.Event()
        async with running_fake(heartbeat_interval=1000) as fake:
            self.fake = fake
            guild = fake.add_guild("Guild")
            fake.add_channel(guild.id, "general")
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> FakeInThread:
        self.thread.start()
        assert self.ready.wait(10)
        assert self.fake is not None
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def wait_for(self, predicate: Callable[[], Any]) -> None:
        """Block this thread until `predicate()` holds, checked on the fake's own loop on every
        change it sees (`FakeDiscord.wait_for`, within its generous PATIENCE)."""
        assert self.fake is not None
        asyncio.run_coroutine_threadsafe(self.fake.wait_for(predicate), self.loop).result()


@pytest.fixture
def fake_thread() -> Iterator[FakeInThread]:
    with FakeInThread() as fake:
        yield fake


def test_bad_token_exits_2_without_leaking_it(
    fake_thread: FakeInThread, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "not-the-real-token-" + "x" * 30
    settings = bot_settings(tmp_path, tiny_model, DISCORD_TOKEN=secret)
    with caplog.at_level(logging.DEBUG):
        assert run_bot(settings) == 2
    assert "rejected DISCORD_TOKEN" in caplog.text
    assert secret not in caplog.text


def test_sigterm_shuts_down_cleanly(
    fake_thread: FakeInThread, tiny_model: Path, tmp_path: Path
) -> None:
    settings = bot_settings(tmp_path, tiny_model)
    fake = fake_thread.fake
    assert fake is not None

    def terminate_when_ready() -> None:
        # up: slash commands synced (the end of setup) and the gateway session identified
        # (READY follows at once); stopped either way, so a bot that never gets there fails
        # the asserts below, not hangs
        try:
            fake_thread.wait_for(lambda: fake.commands(None) and fake.identify_count)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_ready, daemon=True)
    killer.start()
    assert run_bot(settings) == 0
    killer.join(5)
    assert fake.identify_count == 1
    # slash commands were synced globally (no DEV_GUILD_ID)
    names = {c["name"] for c in fake.commands(None)}
    assert {"admin", "persona", "reset", "regenerate", "continue"} <= names
    # the database was closed cleanly: no WAL left behind to replay, and it is intact
    assert (
        not Path(str(settings.db_path) + "-wal").exists()
        or Path(str(settings.db_path) + "-wal").stat().st_size == 0
    )
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.fixture
def unreachable_discord() -> Iterator[None]:
    """discord.py pointed at a local port nobody listens on: what DNS or network loss looks like."""
    import socket

    import yarl
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    old = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = f"http://127.0.0.1:{port}/api/v10"
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws://127.0.0.1:{port}/")
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = old


def test_no_network_at_start_is_one_line_and_a_restartable_exit(
    unreachable_discord: None, tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from bot.discord.client import EXIT_UNREACHABLE

    settings = bot_settings(tmp_path, tiny_model)
    with caplog.at_level(logging.INFO):
        assert run_bot(settings) == EXIT_UNREACHABLE == 75
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "cannot reach Discord" in errors[0].getMessage()
    assert errors[0].exc_info is None and "Traceback" not in caplog.text
    assert "voice will NOT be supported" not in caplog.text
    assert settings.discord_token not in caplog.text
