"""Unprompted replies: when the bot may speak by itself in a channel that went quiet.

oobabot-plugin users (#32, #39) and ad_discordbot's ask for a bot that picks a conversation up
again after a lull, without becoming a spammer. The rules, all per channel and off by default:
after human talk, `IDLE_MINUTES` of silence (any message, the bot's own included, restarts the
wait), then one draw with `IDLE_CHANCE`; never during quiet hours (`IDLE_QUIET_FROM` to
`IDLE_QUIET_TO`, UTC hours); at most `IDLE_PER_HOUR` and `IDLE_PER_DAY` such replies in the
last hour and day; and never twice in a row: a channel is armed by a human message and disarmed
when its chance comes, whatever the outcome, so it speaks again only after someone spoke.

This module holds the rules and what they remember (`IdleLedger`, in memory: a restart forgets
the silences and counts, and arms nothing); `bot.discord.idle` waits on the clock (`bot.clock`)
and posts through the reply runner. Nothing here knows discord.py.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

HOUR = 3600.0
DAY = 24 * HOUR


def quiet_hour(now: float, start: int, end: int) -> bool:
    """Whether `now` falls in the quiet hours `start` to `end` (UTC hours of day, `end` not
    included; they may wrap midnight, 22 to 7); equal hours mean no quiet hours."""
    if start == end:
        return False
    hour = int(now // HOUR % 24)
    return start <= hour < end if start < end else hour >= start or hour < end


@dataclass(slots=True)
class _Channel:
    armed: bool = False  # a human spoke since the last chance
    since: float = 0.0  # the channel's last message
    minutes: float = 0.0  # IDLE_MINUTES when the human spoke
    order: int = 0  # arming order: channels due at the same time are taken in it
    said: deque[float] = field(default_factory=deque)  # times of the unprompted replies


class IdleLedger:
    """Per channel: whether it is armed, since when it is quiet, and its recent idle replies."""

    def __init__(self) -> None:
        self._channels: dict[int, _Channel] = {}
        self._order = itertools.count()

    def heard(self, channel_id: int, minutes: float, now: float) -> None:
        """A human spoke where IDLE_MINUTES is `minutes` (0: off, nothing is armed)."""
        state = self._channels.get(channel_id)
        if minutes <= 0:
            if state is not None:
                state.armed = False
            return
        state = self._channels.setdefault(channel_id, _Channel())
        state.armed, state.since, state.minutes = True, now, minutes
        state.order = next(self._order)

    def saw(self, channel_id: int, now: float) -> bool:
        """Any message in the channel: the silence starts again. Whether it was armed."""
        state = self._channels.get(channel_id)
        if state is None or not state.armed:
            return False
        state.since = max(state.since, now)
        return True

    def next_due(self) -> float | None:
        """When the first armed channel's silence is long enough (None: nothing armed)."""
        return min(
            (s.since + s.minutes * 60 for s in self._channels.values() if s.armed), default=None
        )

    def ripe(self, now: float) -> list[int]:
        """Armed channels quiet long enough at `now`, earliest due (then first armed) first."""
        due = [
            (s.since + s.minutes * 60, s.order, cid)
            for cid, s in self._channels.items()
            if s.armed and s.since + s.minutes * 60 <= now
        ]
        return [cid for *_, cid in sorted(due)]

    def verdict(
        self, channel_id: int, values: Mapping[str, Any], caps: tuple[int, int], now: float
    ) -> str | None:
        """Take the channel's chance (it is disarmed): why it may not speak now, or None when
        it may, subject only to the IDLE_CHANCE draw. `values`: the channel's effective
        settings; `caps`: (IDLE_PER_HOUR, IDLE_PER_DAY)."""
        state = self._channels.get(channel_id)
        if state is None or not state.armed:
            return "not armed"
        state.armed = False
        if float(values.get("idle_minutes") or 0) <= 0:
            return "off here"
        if quiet_hour(
            now, int(values.get("idle_quiet_from") or 0), int(values.get("idle_quiet_to") or 0)
        ):
            return "quiet hours"
        while state.said and state.said[0] <= now - DAY:
            state.said.popleft()
        per_hour, per_day = caps
        if sum(1 for t in state.said if t > now - HOUR) >= per_hour:
            return "hourly cap"
        if len(state.said) >= per_day:
            return "daily cap"
        return None

    def spoke(self, channel_id: int, now: float) -> None:
        """An unprompted reply went out: it counts against the caps."""
        self._channels.setdefault(channel_id, _Channel()).said.append(now)
