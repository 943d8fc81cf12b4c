"""Run the real HermesBot against the fake Discord, for the chat, persona and admin tests.

The bot is the unmodified `bot.discord.client.HermesBot`; only its settings (a temp database, the tiny model)
and, where a test needs output a random tiny model cannot produce on demand, its engine differ:
`ScriptedEngine` implements the same `Engine` interface and streams a given text.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bot.clock import Clock
from bot.discord.client import HermesBot
from bot.engine import (
    Engine,
    EngineFactory,
    EngineInfo,
    EngineRequest,
    GenerationParams,
    make_engine,
)
from bot.settings import Settings, load_settings
from tests.fake_discord import DEFAULT_TOKEN, FakeDiscord, start_client, stop_client


def bot_settings(tmp_path: Path, model: Path | str, **env: str) -> Settings:
    return load_settings(env=bot_env(tmp_path, model, **env), env_file=None)


def bot_env(tmp_path: Path, model: Path | str, **env: str) -> dict[str, str]:
    """The environment `bot_settings` reads: also what a bot in its own process is given."""
    return {
        "DISCORD_TOKEN": DEFAULT_TOKEN,
        "MODEL": str(model),
        "DB_PATH": str(tmp_path / "bot.db"),
        "DTYPE": "float32",
        "DEVICE_MAP": "none",
        "TEMPERATURE": "0",
        "REPETITION_PENALTY": "1.0",
        "MAX_NEW_TOKENS": "12",
        "STREAM_INTERVAL": "0",
        "USER_COOLDOWN": "0",
        "QUEUE_SIZE": "200",
        "REPLY_TIMEOUT": "30",
        **env,
    }


@contextlib.asynccontextmanager
async def running_bot(
    fake: FakeDiscord,
    settings: Settings,
    *,
    engine: Engine | None = None,
    engine_factory: EngineFactory = make_engine,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[HermesBot]:
    bot = HermesBot(
        settings,
        engine=engine,
        engine_factory=engine_factory,
        clock=clock,
        rng=rng,
        guild_ready_timeout=0.05,
    )
    task = await start_client(bot, fake, timeout=30)
    try:
        await bot.wait_until_ready()
        yield bot
    finally:
        await stop_client(bot, task)


class ScriptedEngine(Engine):
    """Streams scripted replies in small pieces; records every prompt it was given.

    `script` maps a call index to a reply text, or is a callable of the prompt. An Exception
    as a reply is raised from the stream, like a failing model would. With a `gate`, every
    reply waits for it before its first piece: a test holds a generation "in progress" for
    exactly as long as it needs, with no sleep to outlast. With `steps` (a semaphore, or a
    callable of the prompt giving one or None), every piece waits for one release of it, as a
    decode step would: a test lets a reply out piece by piece; a step that finds the request
    cancelled ends it there, as the local engine's next step does. `requests` are the requests
    made, in order.
    """

    def __init__(
        self,
        script: Callable[[str], str | BaseException] | list[str | BaseException],
        *,
        delay: float = 0.0,
        piece: int = 40,
        gate: asyncio.Event | None = None,
        steps: asyncio.Semaphore | Callable[[str], asyncio.Semaphore | None] | None = None,
    ) -> None:
        self.script = script
        self.delay = delay
        self.gate = gate
        self.steps = steps
        self.requests: list[EngineRequest] = []
        self.piece = piece
        self.prompts: list[str] = []
        self.params: list[GenerationParams] = []
        self.info = EngineInfo("scripted", "scripted", "float32", "none", "cpu")
        self.started = asyncio.Event()

    async def start(self) -> None:
        self.started.set()

    async def close(self) -> None:
        pass

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> EngineRequest:
        self.prompts.append(prompt)
        self.params.append(params)
        if callable(self.script):
            reply = self.script(prompt)
        else:
            reply = self.script[min(len(self.prompts) - 1, len(self.script) - 1)]
        gen = EngineRequest(prompt, params, cache_key, self.finish_hooks)
        self.requests.append(gen)
        asyncio.get_running_loop().create_task(self._feed(gen, reply))
        return gen

    async def _feed(self, gen: EngineRequest, reply: str | BaseException) -> None:
        steps = self.steps(gen.prompt) if callable(self.steps) else self.steps
        gen.stats.started_at = gen.stats.queued_at
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(reply, BaseException):
            gen.finish("error", reply)
            return
        for i in range(0, len(reply), self.piece):
            if gen.cancelled.is_set():
                gen.finish("cancelled")
                return
            if steps is not None:
                await steps.acquire()
                if gen.cancelled.is_set():
                    gen.finish("cancelled")
                    return
            if self.delay:
                await asyncio.sleep(self.delay)
            gen.stats.new_tokens += 1
            if not gen.emit(reply[i : i + self.piece]):
                break
        gen.finish("eos")


def last_prompt(engine: Any) -> str:
    return engine.prompts[-1]


class FakeClock:
    """A `bot.clock.Clock` a test moves by hand (`advance`): sleepers whose time has come wake,
    and nothing waits for real time. Starts at `start` (seconds since the epoch)."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep_until(self, when: float) -> None:
        if when <= self.t:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (when, fut)
        self._sleepers.append(entry)
        try:
            await fut
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for deadline, fut in list(self._sleepers):
            if deadline <= self.t and not fut.done():
                fut.set_result(None)


class Draws(random.Random):
    """A `random.Random` whose `random()` gives the listed values in turn (then the last)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.drawn = 0

    def random(self) -> float:
        self.drawn += 1
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]
