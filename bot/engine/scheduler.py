"""Admission for the local engine: which queued request runs next, against the KV budget.

Pure bookkeeping on `EngineRequest`s, no tensors, so its rules are tested without a model:
- Requests are admitted first-in first-out while fewer than `max_batch` run and the worst-case
  KV of the running batch plus the newcomer fits `kv_bytes` (0 = no cap). Rows of a batch are
  padded to the longest, so the worst case is `running x longest reservation x bytes/token`.
- A request that does not fit waits at the head of the queue (first come, first served: a
  short request behind it does not overtake it), unless nothing runs: then it is admitted
  alone, since waiting would free nothing.
- The scheduler moves a request's `state` QUEUED -> PREFILL -> DECODING, and to FINISHED when
  it is released (or CANCELLED when it is dropped from the queue); `EngineRequest.finish` sets
  the final state of a request that ran.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from bot.engine.request import EngineRequest, RequestState


@dataclass
class Scheduler:
    """The queue and the running set, with the admission rule above."""

    max_batch: int = 8
    kv_bytes: int = 0  # KV budget in bytes; 0 = no cap
    bytes_per_token: int = 0
    queued: deque[EngineRequest] = field(default_factory=deque)
    running: list[EngineRequest] = field(default_factory=list)

    def submit(self, request: EngineRequest) -> EngineRequest:
        request.state = RequestState.QUEUED
        self.queued.append(request)
        return request

    def reserved_bytes(self, extra_tokens: int = 0) -> int:
        """Worst-case KV of the running requests, plus one more of `extra_tokens` if given."""
        longest = max([r.reserve_tokens for r in self.running] + [extra_tokens])
        count = len(self.running) + (1 if extra_tokens else 0)
        return count * longest * self.bytes_per_token

    def fits(self, request: EngineRequest) -> bool:
        if len(self.running) >= max(1, self.max_batch):
            return False
        if self.kv_bytes <= 0 or not self.running:
            return True
        return self.reserved_bytes(request.reserve_tokens) <= self.kv_bytes

    def admit_next(self) -> EngineRequest | None:
        """Move the head of the queue to PREFILL if it may run now; None if not."""
        if not self.queued or not self.fits(self.queued[0]):
            return None
        request = self.queued.popleft()
        request.state = RequestState.PREFILL
        self.running.append(request)
        return request

    def admit(self) -> Iterator[EngineRequest]:
        """Every request that may run now, in arrival order (re-checked after each)."""
        while (request := self.admit_next()) is not None:
            yield request

    def decoding(self, request: EngineRequest) -> None:
        """The request's prompt is computed; it now decodes in the batch."""
        request.state = RequestState.DECODING

    def release(self, request: EngineRequest) -> None:
        """The request ended (any reason): it no longer holds KV. Safe to call twice, and
        before or after `EngineRequest.finish`."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.queued:
            self.queued.remove(request)
        if not request.state.ended:
            request.state = RequestState.FINISHED

    def drop_cancelled(self) -> list[EngineRequest]:
        """Remove the queued requests whose caller cancelled them (now CANCELLED); returns them."""
        gone = [r for r in self.queued if r.cancelled.is_set()]
        for r in gone:
            self.queued.remove(r)
            r.state = RequestState.CANCELLED
        return gone
