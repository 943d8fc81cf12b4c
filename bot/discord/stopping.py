"""The ⏹ button: stop a reply while it is being written.

Part of the Discord layer, held by the reply runner (`Replier.stops`). While a reply streams,
its growing message carries ⏹ (`ReplyStream.live_view`); the button's custom id names the run,
registered here for as long as it generates. A press by the member the reply answers, or by a
manager (`checks.is_manager`), stops the generation (`ReplyJob.stop`: the engine drops the
request at its next decode step); the text so far stays as the reply, stored marked `stopped`,
and the button goes with the final edit. Anyone else is told privately that it is not theirs.
In a scene each member's reply is its own run with its own button, so a press stops that
member only. The button is a `DynamicItem` registered at start, so one left on a message by a
process that stopped mid-reply is still answered ("already finished"), never "interaction
failed".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import discord

from bot.discord.checks import is_manager
from bot.reply_job import ReplyJob

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

NOT_YOURS = "Only the member this reply answers (or a manager) can stop it."
FINISHED = "This reply is already finished."
STOP_LABEL = "⏹"


@dataclass(slots=True)
class Running:
    """A reply being written: its job, and who may stop it besides managers."""

    job: ReplyJob
    requester: int | None


class StopButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"stop:(?P<key>[0-9]+)"
):
    """The ⏹ under a reply being written; the custom id names the run (`Stops.open`)."""

    def __init__(self, key: int) -> None:
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary, label=STOP_LABEL, custom_id=f"stop:{key}"
            )
        )
        self.key = key

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Button[Any],
        match: re.Match[str],
        /,
    ) -> StopButton:
        return cls(int(match["key"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await cast("HermesBot", interaction.client).replies.stops.press(interaction, self.key)


def stop_view(key: int) -> discord.ui.View:
    """The buttons a reply carries while it is written: ⏹."""
    view = discord.ui.View(timeout=None)
    view.add_item(StopButton(key))
    return view


class Stops:
    """The replies being written now that a member may stop, by their button's key."""

    def __init__(self) -> None:
        self.running: dict[int, Running] = {}

    def open(self, job: ReplyJob, requester: int | None) -> int:
        """Register a reply being written; returns the key its ⏹ button carries."""
        key = random.getrandbits(62)  # unique across restarts too: a stale button finds nothing
        while key in self.running:
            key = random.getrandbits(62)
        self.running[key] = Running(job, requester)
        return key

    def close(self, key: int) -> None:
        """The reply is done (finished, stopped or failed): its button no longer stops it."""
        self.running.pop(key, None)

    async def press(self, interaction: discord.Interaction, key: int) -> None:
        """A ⏹ press: stop the reply if the presser may, else say privately why not."""
        running = self.running.get(key)
        if running is None:
            await interaction.response.send_message(FINISHED, ephemeral=True)
            return
        if interaction.user.id != running.requester and not is_manager(interaction):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        running.job.stop()
        await interaction.response.defer()  # the reply's final edit takes the button away
