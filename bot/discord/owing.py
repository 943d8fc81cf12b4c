"""An owed reply: a member's message the bot decided to answer, as a handle that settles once.

Made by ingest (a live message) or catch-up (a turn still owed after a restart) and settled by
the reply runner (`bot.discord.replying`) or catch-up; see docs/architecture.md, "An owed reply
settles exactly once". No discord.py here: the handle speaks only to the store.
"""

from __future__ import annotations

import enum

from bot.store.owed import OwedReplies


class Outcome(enum.Enum):
    """How an owed reply settled."""

    ANSWERED = "answered"  # a reply (or the part shown before a failure) reached the channel
    FAILED = "failed"  # the reply failed and the member was told so
    GIVEN_UP = "given up"  # not answered on purpose: too old, channel off, busy, nobody's turn
    CANCELLED = "cancelled"  # the message was deleted before its reply was made


class OwedReply:
    """A member's stored message the bot owes a reply: a handle that settles exactly once.

    Made by ingest (a live message) or catch-up (a turn still owed after a restart); settled
    by the runner or, for replies catch-up gives up on or adopts, by catch-up through `settle`.
    Storing the reply's turn settles it in the same transaction (`TurnStore.add(answers=...)`).
    A process that stops while the reply still waits for its channel leaves it unsettled on
    purpose: it stays owed in the store and the next start answers it.
    """

    def __init__(self, store: OwedReplies, turn_id: int, message_id: int | None) -> None:
        self.store = store
        self.turn_id = turn_id
        self.message_id = message_id  # the member's Discord message
        self.outcome: Outcome | None = None
        self._posting = False
        self._posted: int | None = None

    @property
    def settled(self) -> bool:
        return self.outcome is not None

    async def posting(self, persona: str | None) -> None:
        """Record, before the reply's first message is sent, that a post is starting."""
        if not self.settled and not self._posting:
            self._posting = True
            await self.store.posting(self.turn_id, persona)

    async def posted(self, message_id: int) -> None:
        """Record the reply's first message id as soon as Discord returned it."""
        if not self.settled and self._posting and self._posted is None:
            self._posted = message_id
            await self.store.posted(self.turn_id, message_id)

    def stored(self) -> None:
        """The reply's turn was stored with `answers=turn_id`: the store settled it."""
        if self.outcome is None:
            self.outcome = Outcome.ANSWERED

    async def settle(self, outcome: Outcome) -> bool:
        """Settle once; a second call changes nothing. Whether this call settled it."""
        if self.outcome is not None:
            return False
        self.outcome = outcome
        await self.store.mark_answered(self.turn_id)
        return True
