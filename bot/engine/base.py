"""The engine interface and its value types, shared by every engine and every caller.

`Engine.generate(prompt, params)` returns a `Generation`: an async iterator of text pieces that
can be cancelled and that carries the reply's stats (`ReplyStats`) when done. The local engine
(`bot/engine/local.py`) and the OpenAI-compatible one (`bot/engine/openai.py`) both implement
`Engine`; callers never know which one they hold. This module imports nothing else of the engine
package, so every other module can import it without a circle; torch and transformers are not
imported here at all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

log = logging.getLogger("bot.engine")


class EngineError(RuntimeError):
    """A problem the user can fix (bad model path, quantization without CUDA, ...)."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 400
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class ReplyStats:
    """What one reply cost; feeds `/admin model status` and the metrics endpoint."""

    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    finish_reason: str = ""  # eos | stop | length | cancelled | error

    @property
    def queue_wait(self) -> float:
        return (self.started_at or self.queued_at) - self.queued_at

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.queued_at

    @property
    def tokens_per_s(self) -> float:
        if not self.finished_at or not self.started_at or self.new_tokens == 0:
            return 0.0
        return self.new_tokens / max(self.finished_at - self.started_at, 1e-9)


@dataclass(slots=True)
class EngineInfo:
    engine: str
    model: str
    dtype: str = ""
    quantization: str = "none"
    device: str = ""
    started: float = field(default_factory=time.time)
    footprint_mb: float = 0.0  # weights and buffers in memory, measured after loading (local)

    def describe(self) -> str:
        """"dtype X, quantization Y, device Z[, footprint N MB]": the startup log's and doctor's
        line about the loaded model."""
        line = f"dtype {self.dtype or '-'}, quantization {self.quantization}, device {self.device}"
        return line + (f", footprint {self.footprint_mb:.0f} MB" if self.footprint_mb else "")


class StopScanner:
    """Releases streamed text only once it cannot be the start of a stop string.

    Stops may arrive split across pieces ("\\n###" then " Instruction:"), so the tail that could
    still grow into a stop is held back until it can't.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = self.text[:cut]
            return self.flush()
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


#: Called with a reply's stats when it ends (from the worker thread or the event loop). Must be
#: quick and must not raise.
FinishHook = Callable[[ReplyStats], None]


class Outbox:
    """Text pieces for several generations, delivered with one wake-up per event loop."""

    def __init__(self) -> None:
        self._items: dict[Any, list[tuple[asyncio.Queue[Any], str]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, q: asyncio.Queue[Any], text: str) -> None:
        self._items.setdefault(loop, []).append((q, text))

    def flush(self) -> None:
        for loop, items in self._items.items():
            loop.call_soon_threadsafe(_deliver, items)
        self._items = {}


def _deliver(items: list[tuple[asyncio.Queue[Any], str]]) -> None:
    for q, text in items:
        q.put_nowait(text)


class Generation:
    """One request's stream of text pieces. Iterate it; `cancel()` or break to stop early."""

    def __init__(
        self,
        prompt: str,
        params: GenerationParams,
        cache_key: str | None,
        hooks: Sequence[FinishHook] = (),
    ) -> None:
        self.prompt = prompt
        self.params = params
        self.cache_key = cache_key
        self.stats = ReplyStats()
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._scanner = StopScanner(params.stop)
        self._hooks = hooks  # the engine's live list: a hook added later still sees this reply
        self.text = ""

    # --- called from the worker thread ---
    def emit(self, piece: str, outbox: Outbox | None = None) -> bool:
        """Feed raw model text; returns False once a stop string ended the reply.

        With an `outbox`, the text is handed over when the outbox is flushed, so a batch step
        wakes the event loop once for all its rows rather than once per row.
        """
        if self.stats.first_token_at is None and piece:
            self.stats.first_token_at = time.perf_counter()
        safe = self._scanner.feed(piece)
        if safe:
            if outbox is not None:
                outbox.put(self._loop, self._queue, safe)
            else:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, safe)
        return not self._scanner.stopped

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        if rest := self._scanner.flush():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, rest)
        if self._scanner.stopped and reason in ("eos", "length"):
            reason = "stop"
        self.stats.finish_reason = reason
        self.stats.finished_at = time.perf_counter()
        for hook in list(self._hooks):
            try:
                hook(self.stats)
            except Exception:  # metrics must never break a reply
                log.exception("finish hook failed")
        self._loop.call_soon_threadsafe(self._queue.put_nowait, error)

    # --- called from the event loop ---
    def cancel(self) -> None:
        self.cancelled.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.text += item
                yield item
        finally:
            self.cancelled.set()  # the consumer left (break, error or task cancel): stop work

    async def text_all(self) -> str:
        async for _ in self:
            pass
        return self.text


class Engine:
    """The interface both engines implement.

    `finish_hooks` belongs to the instance: whoever watches replies (the metrics exporter)
    registers on the engine it watches, and a reload hands the hooks on to the new engine
    (`Conversations.set_engine`). Implementations pass the list to each `Generation`.
    """

    info: EngineInfo

    @property
    def finish_hooks(self) -> list[FinishHook]:
        hooks = self.__dict__.get("_finish_hooks")
        if hooks is None:
            hooks = self.__dict__["_finish_hooks"] = []
        return hooks

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def generate(
        self, prompt: str, params: GenerationParams, *, cache_key: str | None = None
    ) -> Generation:
        raise NotImplementedError

    @property
    def queue_length(self) -> int:
        return 0

    async def complete(self, prompt: str, params: GenerationParams) -> str:
        return await self.generate(prompt, params).text_all()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what a user-facing error shows."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def params_from_settings(settings: Any, **overrides: Any) -> GenerationParams:
    """The tunable settings (`bot.settings.TUNABLE`: fields marked `tunable`) that are sampling
    parameters, then the non-None `overrides`. Read from the fields' metadata, so the interface
    module imports nothing."""
    tunable = {f.name for f in fields(settings) if f.metadata.get("tunable")}
    names = {f.name for f in fields(GenerationParams)} & tunable
    base = GenerationParams(**{name: getattr(settings, name) for name in names})
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
