"""One engine request, from `Engine.generate` to its end: `EngineRequest` and its `RequestState`.

One object per reply, as transformers' continuous batching keeps one `RequestState` per request:
the caller iterates it for text pieces and may cancel it; the local engine's scheduler admits it,
the batcher prefills and decodes it (its token ids, KV and sampling state live here too), and
`finish` ends it exactly once. Its `state` says where it is:

    QUEUED -> PREFILL -> DECODING -> FINISHED      (eos, stop, length or error)
        \\__________\\__________\\____> CANCELLED   (the caller stopped it)

A request can end from any state (a prompt the tokenizer rejects ends while QUEUED; one that
hits EOS on its first token never decodes). The OpenAI engine uses the stream half, and moves a
request from QUEUED to DECODING when the server starts answering it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from bot.engine.base import FinishHook, GenerationParams, Outbox, ReplyStats, StopScanner

log = logging.getLogger("bot.engine")


class RequestState(enum.Enum):
    QUEUED = "queued"  # handed to the engine, not admitted yet
    PREFILL = "prefill"  # admitted: its prompt's KV is being computed
    DECODING = "decoding"  # in the decode batch, one token per step
    FINISHED = "finished"  # ended by eos, a stop string, the length limit or an error
    CANCELLED = "cancelled"  # ended because the caller cancelled it or stopped reading

    @property
    def ended(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.CANCELLED)


@dataclass(eq=False)
class EngineRequest:
    """One reply's request: its stream of text pieces, its stats, and the engine's work on it.

    Iterate it for text pieces; `cancel()` or leave the loop to stop it early. Engines call
    `emit` and `finish` (from any thread); the local engine fills in the fields below `state`.
    """

    prompt: str
    params: GenerationParams
    cache_key: str | None = None  # the channel whose cached prefix this request may reuse
    #: the engine's live list of finish hooks: a hook added later still sees this reply
    hooks: Sequence[FinishHook] = ()
    _: KW_ONLY
    #: PROMPT_FORMAT=server: the role messages, sent instead of `prompt` (OpenAI chat endpoint)
    messages: list[dict[str, Any]] | None = None
    state: RequestState = RequestState.QUEUED
    stats: ReplyStats = field(default_factory=ReplyStats)
    text: str = ""  # what the caller has read so far
    cancelled: threading.Event = field(default_factory=threading.Event)
    # --- the local engine's work, set at tokenizing and at admission ---
    ids: list[int] = field(default_factory=list)  # prompt, then each generated token once fed
    prompt_len: int = 0
    done: int = 0  # tokens of `ids` whose KV is computed
    kv: Any = None  # its own DynamicCache while prefilling; None once in the batch
    next_token: int | None = None  # sampled, not yet fed
    processors: Any = None  # transformers logits processors for `params`
    generator: Any = None  # torch.Generator, seeded from `params.seed` or at random
    decoder: Any = None  # IncrementalDecoder: generated ids to text pieces
    history: Any = None  # LongTensor of prompt + generated ids, for repetition penalty
    eos: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._scanner = StopScanner(self.params.stop)

    def tokenized(self, ids: list[int]) -> EngineRequest:
        """Set the prompt's token ids (the local engine, before the request is queued)."""
        self.ids = list(ids)
        self.prompt_len = len(self.ids)
        return self

    @property
    def reserve_tokens(self) -> int:
        """The most KV columns this request can need: its prompt plus its whole reply."""
        return self.prompt_len + max(self.params.max_new_tokens, 0)

    # --- called by the engine (its worker thread or the event loop) ---
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
        """End the request: flush held-back text, record why, run the hooks, close the stream."""
        if rest := self._scanner.flush():
            self._loop.call_soon_threadsafe(self._queue.put_nowait, rest)
        if self._scanner.stopped and reason in ("eos", "length"):
            reason = "stop"
        self.state = RequestState.CANCELLED if reason == "cancelled" else RequestState.FINISHED
        self.stats.finish_reason = reason
        self.stats.finished_at = time.perf_counter()
        for hook in list(self.hooks):
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
