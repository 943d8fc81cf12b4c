"""Editing what the bot remembers of one message: "Hide from the bot" and "Edit remembered text".

Part of the Discord layer; the message context-menu commands (`cogs/chat.py`) call in here. A
message's stored turn (any chunk of a split reply finds it) can be hidden, so that it stays in
memory but is left out of prompts, recall and the training export (`TurnStore.mark`), or its
remembered text can be rewritten in a modal, so the next prompt shows the new text while the
Discord message stays as it was. The turn's author may do either to their own turns, a manager
(`checks.is_manager`) to any; the bot's replies are the managers'. Both are audited through the
one audit writer (`checks.audit`). A reply's swipe alternatives end with either change: they
no longer match what memory holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import discord

from bot.discord.answering import say_privately
from bot.discord.checks import audit, is_manager
from bot.store.turns import StoredTurn

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

NOT_STORED = "I don't remember that message (it was never stored, or it was deleted)."
NOT_YOURS = "Only the message's author (or a manager) can change what I remember of it."
ALREADY_HIDDEN = "That message is already hidden from me."
HIDDEN = "Hidden: I won't see that message any more (it stays stored, marked hidden)."
EDITED = "Done: that is what I remember of the message now."
EMPTY = "Not changed: the remembered text can't be empty (hide the message instead)."
UNCHANGED = "Not changed: that is already what I remember."
#: Longest text a modal's text input holds (Discord's limit).
MODAL_TEXT_LIMIT = 4000
TOO_LONG = f"That message is too long to edit here (over {MODAL_TEXT_LIMIT} characters)."


def may_change(interaction: discord.Interaction, turn: StoredTurn) -> bool:
    """The turn's author for their own turns, a manager for any (the bot's replies included)."""
    return is_manager(interaction) or (
        turn.role == "user" and turn.author_id is not None and turn.author_id == interaction.user.id
    )


async def _turn(interaction: discord.Interaction, message_id: int) -> StoredTurn | None:
    """The stored turn of `message_id` the user may change; None once they were told why not."""
    bot = cast("HermesBot", interaction.client)
    turn = await bot.memory.turns.for_message(message_id)
    if turn is None:
        await say_privately(interaction, NOT_STORED)
        return None
    if not may_change(interaction, turn):
        await say_privately(interaction, NOT_YOURS)
        return None
    return turn


async def hide(interaction: discord.Interaction, message: discord.Message) -> None:
    """ "Hide from the bot": the message's turn stays stored, marked hidden."""
    turn = await _turn(interaction, message.id)
    if turn is None:
        return
    if turn.hidden:
        await say_privately(interaction, ALREADY_HIDDEN)
        return
    memory = cast("HermesBot", interaction.client).memory
    await memory.turns.mark(turn.id, hidden=True)
    await memory.swipes.end(turn.id)
    await audit(interaction, "memory.hide", None, turn.id, turn.channel_id)
    await say_privately(interaction, HIDDEN)


async def open_editor(interaction: discord.Interaction, message: discord.Message) -> None:
    """ "Edit remembered text": a modal holding the turn's remembered text."""
    turn = await _turn(interaction, message.id)
    if turn is None:
        return
    if len(turn.content) > MODAL_TEXT_LIMIT:
        await say_privately(interaction, TOO_LONG)
        return
    await interaction.response.send_modal(RememberedText(turn.id, turn.content))


async def edit(interaction: discord.Interaction, turn_id: int, text: str) -> None:
    """The modal was submitted: store `text` as the turn's content, checked again now."""
    bot = cast("HermesBot", interaction.client)
    memory = bot.memory
    turn = await memory.turns.get(turn_id)
    if turn is None:
        await say_privately(interaction, NOT_STORED)
        return
    if not may_change(interaction, turn):
        await say_privately(interaction, NOT_YOURS)
        return
    text = text.strip()
    if not text:
        await say_privately(interaction, EMPTY)
        return
    if text == turn.content:
        await say_privately(interaction, UNCHANGED)
        return
    await memory.turns.update(turn.id, text, bot.conv.counter(text))
    await memory.swipes.end(turn.id)
    await audit(interaction, "memory.edit", turn.content, text, turn.channel_id)
    await say_privately(interaction, EDITED)


class RememberedText(discord.ui.Modal, title="Edit remembered text"):
    """The remembered text of one turn, to rewrite; submitting stores it (`edit`)."""

    text: discord.ui.TextInput[RememberedText] = discord.ui.TextInput(
        label="What the bot remembers",
        style=discord.TextStyle.paragraph,
        max_length=MODAL_TEXT_LIMIT,
        custom_id="remembered-text",
    )

    def __init__(self, turn_id: int, current: str) -> None:
        super().__init__(custom_id=f"remembered:{turn_id}")
        self.turn_id = turn_id
        self.text.default = current

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await edit(interaction, self.turn_id, self.text.value)
