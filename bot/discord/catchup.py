"""Catch-up: what the bot missed while it was away, and the replies it still owes.

When the bot starts, and whenever the gateway gives it a new session (a resumed one replays
what it missed; a new one does not), it reads back each served channel's recent history,
stores what memory lacks and answers what was addressed to it, oldest first, through the normal
queue. Replies owed from before a stop (stored `awaiting` turns, see `bot.memory`) are answered
the same way. This module holds the rules, free of discord.py: how far back to read, which owed
replies are still worth giving, and the in-process claims that keep two paths (a live event and
catch-up) from answering one message twice. The Discord side lives in `cogs/chat.py`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from bot.store.turns import StoredTurn

#: Discord's epoch (2015-01-01T00:00:00Z) in milliseconds: snowflakes count from it.
DISCORD_EPOCH_MS = 1_420_070_400_000


def snowflake_at(timestamp: float) -> int:
    """The smallest snowflake of a moment (seconds since the Unix epoch)."""
    return max(0, int(timestamp * 1000) - DISCORD_EPOCH_MS) << 22


def snowflake_time(snowflake: int) -> float:
    """The moment (seconds since the Unix epoch) a snowflake was made."""
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


def history_floor(newest_stored: int | None, now: float, minutes: float) -> int:
    """Read a channel's history after this message id: after the newest message memory holds,
    and never further back than `minutes` before `now`."""
    oldest = snowflake_at(now - minutes * 60)
    return max(oldest, newest_stored or 0)


@dataclass(slots=True)
class Owed:
    """The stored turns still awaiting a reply, split by whether one is still worth giving."""

    answer: list[StoredTurn]  # oldest first
    expired: list[StoredTurn]  # older than the catch-up window: dropped without a reply


def owed_replies(turns: Iterable[StoredTurn], now: float, minutes: float) -> Owed:
    """Sort the awaiting turns: a question older than the catch-up window is not answered
    late (the conversation has moved on); the rest are, oldest first."""
    cutoff = now - minutes * 60
    answer: list[StoredTurn] = []
    expired: list[StoredTurn] = []
    for turn in sorted(turns, key=lambda t: t.id):
        (answer if turn.created_at >= cutoff else expired).append(turn)
    return Owed(answer, expired)


class Claims:
    """Message ids this process has taken charge of (stored, or answering), newest kept.

    A message can reach the bot twice: as a live event and in catch-up's read of the history
    (or as a stored owed turn while its live answer is still queued). Claiming is synchronous,
    so between two awaits exactly one path wins.
    """

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._ids: OrderedDict[int, None] = OrderedDict()

    def claim(self, message_id: int) -> bool:
        """Take `message_id`; False when it was already taken."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True

    def release(self, message_id: int) -> None:
        """Give `message_id` back (nothing was done with it after all)."""
        self._ids.pop(message_id, None)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids
