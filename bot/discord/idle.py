"""Unprompted replies in Discord: waits on the bot's clock for a quiet channel's chance, then
posts through the reply runner. The rules (when a channel may speak, the caps) are `bot.idle`.

One task (`IdleReplies.run`, started with the bot) sleeps until the first armed channel is due
or ingest reports a message (`heard`, `saw`), then takes the channels that are due one at a
time, in the order they became due. An unprompted reply is a plain reply to the latest turn,
made in the channel's slot like any other (`Replier.run`), with the channel's persona.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import TYPE_CHECKING

from bot.clock import Clock
from bot.conversation import Busy
from bot.discord.checks import policy_for
from bot.discord.replying import Reply
from bot.idle import IdleLedger

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)


class IdleReplies:
    """Owned by the bot (`HermesBot.idle`); `clock` and `rng` are the bot's."""

    def __init__(self, bot: HermesBot, clock: Clock, rng: random.Random) -> None:
        self.bot = bot
        self.clock = clock
        self.rng = rng
        self.ledger = IdleLedger()
        self._changed = asyncio.Event()

    def heard(self, channel_id: int, minutes: float) -> None:
        """A member spoke in `channel_id`, where IDLE_MINUTES is `minutes` (0: off)."""
        self.ledger.heard(channel_id, minutes, self.clock.now())
        self._changed.set()

    def saw(self, channel_id: int) -> None:
        """Any message in `channel_id` (the bot's own too): its silence starts again."""
        if self.ledger.saw(channel_id, self.clock.now()):
            self._changed.set()

    async def run(self) -> None:
        """Forever: sleep until a channel is due (or the ledger changes), then take its chance."""
        while True:
            self._changed.clear()
            waits = [asyncio.ensure_future(self._changed.wait())]
            due = self.ledger.next_due()
            if due is not None:
                waits.append(asyncio.ensure_future(self.clock.sleep_until(due)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            for channel_id in self.ledger.ripe(self.clock.now()):
                try:
                    await self.consider(channel_id)
                except Exception:  # one channel's failure must not end unprompted replies
                    log.exception("unprompted reply failed in channel %s", channel_id)

    async def consider(self, channel_id: int) -> None:
        """Take `channel_id`'s chance: speak if the rules and the draw allow."""
        bot = self.bot
        channel = bot.get_channel(channel_id)
        if channel is None:
            self.ledger.verdict(channel_id, {}, (0, 0), self.clock.now())  # disarm it
            return
        guild = getattr(channel, "guild", None)
        guild_id = guild.id if guild is not None else None
        policy = await policy_for(bot, channel, guild_id)
        settings = bot.settings
        now = self.clock.now()
        why = self.ledger.verdict(
            channel_id, policy.settings.values, (settings.idle_per_hour, settings.idle_per_day), now
        )
        if why is None and policy.mode == "off":
            why = "switched off"
        if why is None and self.rng.random() >= float(policy.settings.values["idle_chance"]):
            why = "the draw"
        if why is not None:
            log.info("no unprompted reply in channel %s: %s", channel_id, why)
            return
        with contextlib.suppress(Busy):
            async with bot.conv.slot(channel_id):
                result = await bot.replies.run(Reply(channel, guild_id))  # type: ignore[arg-type]
            if result.ok and result.messages:
                self.ledger.spoke(channel_id, now)
                log.info("unprompted reply in channel %s", channel_id)
