"""The engine's value types, shared by every engine and every caller.

What a reply is asked for (`GenerationParams`), what it cost (`ReplyStats`), what serves it
(`EngineInfo`), the user-fixable `EngineError`, and the small helpers a request streams through
(`StopScanner`, `Outbox`). The request itself is `request.py`'s, the interface `interface.py`'s.
This module imports nothing else of the engine package, so every other module can import it
without a circle; torch and transformers are not imported here at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any


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
    #: token ids that end the reply besides the model's EOS: the chat template's end-of-turn
    #: token (`<|im_end|>`, `<|eot_id|>`), from `bot.prompt_template.TemplateFormat.end_ids`
    stop_ids: tuple[int, ...] = ()


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
    notes: list[str] = field(default_factory=list)  # why this engine, what reaches the server
    dtype_why: str = ""  # why this dtype (DTYPE=auto's hardware rule, or "set by DTYPE")

    def describe(self) -> str:
        """"dtype X[ (why)], quantization Y, device Z[, footprint N MB]": the startup log's and
        doctor's line about the loaded model."""
        line = (
            f"dtype {self.dtype_said('-')}, quantization {self.quantization}, device {self.device}"
        )
        return line + (f", footprint {self.footprint_mb:.0f} MB" if self.footprint_mb else "")

    def dtype_said(self, unknown: str) -> str:
        """The dtype with why it was chosen where known ("float32 (auto: this CPU has ...)")."""
        dtype = self.dtype or unknown
        return f"{dtype} ({self.dtype_why})" if self.dtype_why else dtype


class StopScanner:
    """Releases streamed text only once it cannot be the start of a stop string.

    Stops may arrive split across pieces ("\\n###" then " Instruction:"), so the tail that could
    still grow into a stop is held back until it can't. A stop that starts with `#` (a block
    header) also takes the run of `#` written just before it: the model's `#### Instruction`
    matched by the stop `### Instruction` must not leave a stray `#` in the reply.
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
        found = [(i, s) for s in self.stops if (i := self.text.find(s)) >= 0]
        if found:
            cut, stop = min(found)
            self.stopped = True
            self.text = self.text[: _lead_in(self.text, cut, stop)]
            self.sent = min(self.sent, len(self.text))
            return self.flush()
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    hold = max(hold, len(self.text) - _lead_in(self.text, len(self.text) - k, stop))
                    break
        safe = len(self.text) - hold
        out = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


def _lead_in(text: str, at: int, stop: str) -> int:
    """Where a stop found at `at` really starts: before the `#`s run into a `#`-led stop."""
    if stop.startswith("#"):
        while at > 0 and text[at - 1] == "#":
            at -= 1
    return at


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
