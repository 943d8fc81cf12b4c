"""Running the fake for a test: ``running_fake`` points discord.py at it, and
``start_client``/``stop_client``/``connected_client`` run a real client against it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from tests.fake_discord.common import PATIENCE
from tests.fake_discord.core import FakeDiscord


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
    client: discord.Client,
    fake: FakeDiscord,
    token: str | None = None,
    *,
    timeout: float = PATIENCE,
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
    client: discord.Client,
    fake: FakeDiscord,
    token: str | None = None,
    *,
    timeout: float = PATIENCE,
) -> AsyncIterator[discord.Client]:
    """``async with connected_client(client, fake):`` — ready on entry, closed on exit."""
    task = await start_client(client, fake, token, timeout=timeout)
    try:
        yield client
    finally:
        await stop_client(client, task)
