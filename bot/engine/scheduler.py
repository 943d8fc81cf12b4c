"""Admission for the local engine: which waiting request runs next, against the KV budget.

Pure bookkeeping, no tensors, so its rules are tested without a model:
- Requests are admitted first-in first-out while fewer than `max_batch` run and the worst-case
  KV of the running batch plus the newcomer fits `kv_bytes` (0 = no cap). Rows of a batch are
  padded to the longest, so the worst case is `running x longest reservation x bytes/token`.
- A request that does not fit waits at the head of the queue (first come, first served: a
  short request behind it does not overtake it), unless nothing runs: then it is admitted
  alone, since waiting would free nothing.
- Each request moves WAITING -> PREFILLING -> DECODING -> FINISHED (or straight to FINISHED
  when it is cancelled, fails or ends during its prefill).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class RequestState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request as the scheduler sees it; `item` is whatever the caller attached."""

    prompt_tokens: int
    max_new_tokens: int
    item: Any = None
    state: RequestState = RequestState.WAITING

    @property
    def reserve_tokens(self) -> int:
        """The most KV columns this request can need: its prompt plus its whole reply."""
        return self.prompt_tokens + max(self.max_new_tokens, 0)


@dataclass
class Scheduler:
    """The waiting queue and the running set, with the admission rule above."""

    max_batch: int = 8
    kv_bytes: int = 0  # KV budget in bytes; 0 = no cap
    bytes_per_token: int = 0
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    peak_running: int = 0

    def submit(self, request: Request) -> Request:
        request.state = RequestState.WAITING
        self.waiting.append(request)
        return request

    def reserved_bytes(self, extra_tokens: int = 0) -> int:
        """Worst-case KV of the running requests, plus one more of `extra_tokens` if given."""
        longest = max([r.reserve_tokens for r in self.running] + [extra_tokens])
        count = len(self.running) + (1 if extra_tokens else 0)
        return count * longest * self.bytes_per_token

    def fits(self, request: Request) -> bool:
        if len(self.running) >= max(1, self.max_batch):
            return False
        if self.kv_bytes <= 0 or not self.running:
            return True
        return self.reserved_bytes(request.reserve_tokens) <= self.kv_bytes

    def admit_next(self) -> Request | None:
        """Move the head of the queue to PREFILLING if it may run now; None if not."""
        if not self.waiting or not self.fits(self.waiting[0]):
            return None
        request = self.waiting.popleft()
        request.state = RequestState.PREFILLING
        self.running.append(request)
        self.peak_running = max(self.peak_running, len(self.running))
        return request

    def admit(self) -> Iterator[Request]:
        """Every request that may run now, in arrival order (re-checked after each)."""
        while (request := self.admit_next()) is not None:
            yield request

    def decoding(self, request: Request) -> None:
        """The request's prompt is computed; it now decodes in the batch."""
        request.state = RequestState.DECODING

    def release(self, request: Request) -> None:
        """The request ended (any reason): it no longer holds KV. Safe to call twice."""
        if request.state is RequestState.FINISHED:
            return
        if request.state is RequestState.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        request.state = RequestState.FINISHED

    def drop_waiting(self, pred: Callable[[Request], bool]) -> list[Request]:
        """Remove (and finish) the waiting requests for which `pred` holds; returns them."""
        gone = [r for r in self.waiting if pred(r)]
        for r in gone:
            self.release(r)
        return gone
