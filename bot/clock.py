"""The clock the bot waits on for things it does by itself (unprompted replies, `bot.idle`).

Why a seam: an unprompted reply comes minutes or hours after the last message, and its caps
count per hour and per day; a test cannot wait that long, and must not race a real clock. The
bot takes a `Clock` as a constructor argument (`HermesBot(clock=...)`); `SystemClock` is the
real one, and a test passes its own that it moves forward by hand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Wall time and sleeping on it."""

    def now(self) -> float:
        """Seconds since the Unix epoch (quiet hours read the UTC hour of day from it)."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return once this clock reads `when` or later (at once if it already does). An
        absolute time, so a clock that moves between the call and the wait loses nothing."""
        ...


class SystemClock:
    """The real clock: `time.time` and `asyncio.sleep`."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, when: float) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
