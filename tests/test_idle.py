"""Unprompted replies through the fake Discord, on a fake clock (no sleeps): after human talk
and IDLE_MINUTES of silence the bot may speak by itself, at most IDLE_PER_HOUR / IDLE_PER_DAY
times, never twice in a row, never in quiet hours, only with its IDLE_CHANCE, and never where
IDLE_MINUTES is left at its default.

"Nothing happened" in a channel is proven by another channel that became due at the same time,
later in order: the bot takes due channels one at a time, in that order, so when the later
one's reply is up the first one's chance has come and gone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.idle import quiet_hour
from bot.settings import Settings
from tests.bot_harness import Draws, FakeClock, ScriptedEngine, running_bot
from tests.fake_discord import FakeChannel, FakeUser
from tests.test_admin import bot_messages, command, stored
from tests.world import World

pytestmark = pytest.mark.slow

NOON = datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()
HOUR = 3600.0


def test_quiet_hours_may_wrap_midnight() -> None:
    at = lambda hour: NOON - 12 * HOUR + hour * HOUR  # noqa: E731  (that day, at `hour` UTC)
    assert quiet_hour(at(12), 12, 13) and not quiet_hour(at(13), 12, 13)
    assert quiet_hour(at(23), 22, 7) and quiet_hour(at(3), 22, 7)
    assert not quiet_hour(at(12), 22, 7)
    assert not quiet_hour(at(5), 4, 4)  # equal hours: none


class Idle:
    """The world, the bot and its clock, with the moves the tests make."""

    def __init__(self, w: World, bot, clock: FakeClock) -> None:
        self.w, self.bot, self.clock = w, bot, clock

    async def talk(self, channel: FakeChannel, user: FakeUser, text: str) -> None:
        """A member says something (not to the bot); returns once the bot has stored it."""
        await stored(self.bot, await self.w.fake.user_message(channel.id, user, text))

    def posts(self, channel: FakeChannel) -> int:
        return len(bot_messages(self.w.fake, channel.id))

    async def posted(self, channel: FakeChannel, count: int) -> None:
        await self.w.fake.wait_for(
            lambda: self.posts(channel) == count and not self.bot.conv.pending
        )


async def test_idle_replies_keep_their_caps_and_never_come_twice_in_a_row(
    world: World, tmp_path: Path
) -> None:
    w = world
    minutes = 10
    wait = minutes * 60
    clock = FakeClock(NOON)
    proofs = [w.fake.add_channel(w.guild.id, f"proof-{i}") for i in range(3)]
    settings = w.settings(
        tmp_path,
        IDLE_MINUTES=str(minutes),
        IDLE_CHANCE="1",
        IDLE_PER_HOUR="1",
        IDLE_PER_DAY="2",
    )
    engine = ScriptedEngine(lambda prompt: "So, where were we?")
    async with running_bot(w.fake, settings, engine=engine, clock=clock) as bot:
        t = Idle(w, bot, clock)
        a = w.general
        await t.talk(a, w.alice, "anyone up for a game later?")
        clock.advance(wait - 1)
        await t.talk(proofs[0], w.bob, "a minute before it is due")  # its own silence starts
        clock.advance(1)
        await t.posted(a, 1)  # silence long enough: the bot speaks by itself
        assert t.posts(proofs[0]) == 0
        assert "anyone up for a game later?" in engine.prompts[-1]
        # never twice in a row: no human spoke in `a` since, so only the proof channel speaks
        clock.advance(wait)
        await t.posted(proofs[0], 1)
        assert t.posts(a) == 1
        # the hourly cap: `a` spoke 20 minutes ago
        await t.talk(a, w.alice, "so, that game?")
        await t.talk(proofs[1], w.bob, "hello?")
        clock.advance(wait)
        await t.posted(proofs[1], 1)
        assert t.posts(a) == 1
        # an hour after its first, `a` may speak again
        clock.advance(HOUR)
        await t.talk(a, w.alice, "still nobody?")
        clock.advance(wait)
        await t.posted(a, 2)
        # the daily cap: two today
        await t.talk(a, w.alice, "one more try")
        await t.talk(proofs[2], w.bob, "hm")
        clock.advance(wait)
        await t.posted(proofs[2], 1)
        assert t.posts(a) == 2
        # a day after its first two, `a` may speak again
        clock.advance(24 * HOUR)
        await t.talk(a, w.alice, "new day")
        clock.advance(wait)
        await t.posted(a, 3)


async def test_idle_replies_are_off_by_default_quiet_in_quiet_hours_and_drawn(
    world: World, tmp_path: Path
) -> None:
    w = world
    assert Settings().idle_minutes == 0  # off unless set
    clock = FakeClock(NOON)
    draws = Draws(0.2, 0.2, 0.7, 0.2)  # IDLE_CHANCE is 0.5 by default: 0.7 says no
    assert Settings().idle_chance == 0.5
    wait = 10 * 60
    proofs = [w.fake.add_channel(w.guild.id, f"proof-{i}") for i in range(3)]
    engine = ScriptedEngine(lambda prompt: "Quiet today.")
    async with running_bot(
        w.fake, w.settings(tmp_path), engine=engine, clock=clock, rng=draws
    ) as bot:
        t = Idle(w, bot, clock)
        a = w.general
        for channel in proofs:
            await command(
                w, w.admin, "admin settings set", {"name": "idle_minutes", "value": "10"},
                channel=channel.id,
            )  # fmt: skip
        # off by default: `a` never speaks, however long the silence
        await t.talk(a, w.alice, "hello, anyone?")
        await t.talk(proofs[0], w.bob, "hi")
        clock.advance(wait)
        await t.posted(proofs[0], 1)
        assert t.posts(a) == 0 and draws.drawn == 1
        # quiet hours 12 to 13 UTC in `a`: no reply there, and no draw is taken for it
        for name, value in (("idle_minutes", "10"), ("idle_quiet_from", "12"),
                            ("idle_quiet_to", "13")):  # fmt: skip
            await command(w, w.admin, "admin settings set", {"name": name, "value": value})
        await t.talk(a, w.alice, "it's lunchtime")
        await t.talk(proofs[1], w.bob, "hey")
        clock.advance(wait)
        await t.posted(proofs[1], 1)
        assert t.posts(a) == 0 and draws.drawn == 2
        # after the quiet hours: a draw of 0.7 against a chance of 0.5 says no...
        clock.advance(HOUR)
        await t.talk(a, w.alice, "afternoon")
        await t.talk(proofs[2], w.bob, "yo")
        clock.advance(wait)
        await t.posted(proofs[2], 1)
        assert t.posts(a) == 0 and draws.drawn == 4
        # ...and the next silence after human talk is a new chance, taken
        await t.talk(a, w.alice, "anyone at all?")
        clock.advance(wait)
        await t.posted(a, 1)
