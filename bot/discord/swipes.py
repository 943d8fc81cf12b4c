"""Swipes: alternative versions of a reply, chosen with buttons under it.

Part of the Discord layer, owned by the bot (`HermesBot.swipes`). Under each one-message reply
sit ◀, a counter ("2/3"), ▶ and 🔁. 🔁 generates another alternative with a new seed and shows
it; ◀ ▶ move between the alternatives. The turn's stored text is always the alternative shown,
so the one shown when the conversation moves on is what memory keeps; after that (or after a
`/continue` extended it) the reply is settled. Only the member whose message was answered (or a
manager, `bot.discord.checks.is_manager`) may swipe, where the channel policy lets them use the
bot. The buttons are `DynamicItem`s; a click finds its turn from the message it is on (buttons
from earlier versions name the turn in their custom id), and the alternatives live in SQLite, so
buttons keep working after a restart. Because the buttons need no id, they go out with the
reply's final send or edit (`posting.ReplyStream.final_view`), not in an edit of their own.
"""

from __future__ import annotations

import logging
import random
import re
from typing import TYPE_CHECKING, Any, cast

import discord

from bot.conversation import Busy
from bot.discord.checks import is_manager, policy_for
from bot.discord.posting import LIMIT, NO_PINGS

if TYPE_CHECKING:
    from bot.discord.client import HermesBot
    from bot.store.scenes import SwipeStore

log = logging.getLogger(__name__)

NOT_YOURS = "Only the member this reply answered (or a manager) can swipe it."
SETTLED = "The conversation has moved on, so this reply stays as it is."
GONE = "This reply can no longer be swiped."
NOTHING_NEW = "I could not come up with another version; the current one stays."

_STYLE = discord.ButtonStyle.secondary
_LABELS = {"prev": "◀", "next": "▶", "new": "🔁"}


class SwipeButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"swipe:(?P<action>prev|next|new|count)(?::(?P<turn>[0-9]+))?",
):
    """One of a reply's swipe buttons; the custom id carries the action (and, on buttons from
    earlier versions, the turn id; a click otherwise finds the turn from its message)."""

    def __init__(
        self, action: str, turn_id: int | None = None, label: str = "", disabled: bool = False
    ) -> None:
        super().__init__(
            discord.ui.Button(
                style=_STYLE,
                label=label or _LABELS.get(action, "·"),
                custom_id=f"swipe:{action}" + (f":{turn_id}" if turn_id is not None else ""),
                disabled=disabled,
            )
        )
        self.action = action
        self.turn_id = turn_id

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Button[Any],
        match: re.Match[str],
        /,
    ) -> SwipeButton:
        turn = int(match["turn"]) if match["turn"] else None
        return cls(match["action"], turn, item.label or "")

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = cast("HermesBot", interaction.client)
        turn_id = self.turn_id
        if turn_id is None and interaction.message is not None:
            turn = await bot.memory.turns.for_message(interaction.message.id)
            turn_id = turn.id if turn is not None else None
        if turn_id is None:
            await interaction.response.send_message(GONE, ephemeral=True)
            return
        await bot.swipes.click(interaction, self.action, turn_id)


def swipe_view(shown: int = 0, total: int = 1) -> discord.ui.View:
    """The buttons under a reply showing alternative `shown` (0-based) of `total`."""
    view = discord.ui.View(timeout=None)
    view.add_item(SwipeButton("prev", disabled=shown <= 0))
    view.add_item(SwipeButton("count", label=f"{shown + 1}/{total}", disabled=True))
    view.add_item(SwipeButton("next", disabled=shown >= total - 1))
    view.add_item(SwipeButton("new"))
    return view


def one_message(prefix: str, text: str) -> str:
    """`text` cut to fit one message after `prefix` (alternatives are swapped in place)."""
    room = LIMIT - len(prefix)
    return text if len(text) <= room else text[: room - 1].rstrip() + "…"


class Swipes:
    """Puts the buttons under replies and answers their clicks."""

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot

    async def start(
        self, turn_id: int, text: str, reply_to: int | None, asked_turn: int | None
    ) -> None:
        """Keep the first alternative of a reply shown with `swipe_view()` (`text`: its stored
        text); the buttons went out with the reply itself.

        `reply_to` is the turn the reply answered (its prompt is rebuilt from there), and
        `asked_turn` the human message that led to it: its author may swipe."""
        memory = self.bot.memory
        asked = await memory.turns.get(asked_turn) if asked_turn is not None else None
        await memory.swipes.start(
            turn_id,
            text,
            self.bot.conv.counter(text.strip()),
            reply_to=reply_to,
            requester=asked.author_id if asked else None,
        )

    async def click(self, interaction: discord.Interaction, action: str, turn_id: int) -> None:
        memory = self.bot.memory
        state = await memory.swipes.get(turn_id)
        turn = await memory.turns.get(turn_id)
        channel = interaction.channel
        if state is None or turn is None or channel is None:
            await interaction.response.send_message(GONE, ephemeral=True)
            return
        if interaction.user.id != state.requester and not is_manager(interaction):
            await interaction.response.send_message(NOT_YOURS, ephemeral=True)
            return
        policy = await policy_for(self.bot, channel, interaction.guild_id, interaction.user)
        if (refusal := policy.refusal_to_speak()) is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        if await memory.turns.user_spoke_after(turn.channel_id, turn_id):
            await interaction.response.send_message(SETTLED, ephemeral=True)
            return
        identity = await self.bot.webhooks.identity(channel, turn.persona, interaction.guild_id)
        if action in ("prev", "next"):
            idx = state.shown + (1 if action == "next" else -1)
            text = await memory.swipes.show(turn_id, idx)
            if text is None:
                await interaction.response.defer()
                return
            await interaction.response.edit_message(
                content=identity.prefix + text,
                view=swipe_view(idx, len(state.alternatives)),
                allowed_mentions=NO_PINGS,
            )
            return
        if action != "new":
            await interaction.response.defer()
            return
        await interaction.response.defer()
        target = SwipedMessage(interaction, identity.prefix, turn_id, memory.swipes)
        try:
            result = await self.bot.replies.alternative(
                channel,  # type: ignore[arg-type]
                interaction.guild_id,
                turn,
                state.reply_to,
                target,
                seed=random.randrange(1 << 30),
            )
        except Busy:
            result = None
        if result is None or not result.ok or result.empty or not target.messages:
            await interaction.followup.send(NOTHING_NEW, ephemeral=True)


class SwipedMessage:
    """Where a swipe's new alternative is shown: the swiped message, edited in place through
    the interaction, cut to one message, with the buttons counting it (a `replying.Target`)."""

    def __init__(
        self, interaction: discord.Interaction, prefix: str, turn_id: int, swipes: SwipeStore
    ) -> None:
        self.interaction = interaction
        self.prefix = prefix
        self.turn_id = turn_id
        self.swipes = swipes
        self.messages: list[discord.Message] = []
        self.text = ""

    async def update(self, text: str) -> None:
        """Alternatives are shown complete, never growing."""

    def fit(self, text: str) -> str:
        """What is shown (and stored): `text` cut to one message after the persona's name."""
        return one_message(self.prefix, text)

    async def finish(self, text: str) -> list[discord.Message]:
        """Show the stored alternative, the newest of the turn's."""
        self.text = self.fit(text)
        state = await self.swipes.get(self.turn_id)
        total = len(state.alternatives) if state else 1
        message = await self.interaction.edit_original_response(
            content=self.prefix + self.text,
            view=swipe_view(total - 1, total),
            allowed_mentions=NO_PINGS,
        )
        self.messages = [message]
        return self.messages
