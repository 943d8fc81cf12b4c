"""Answering slash commands inside Discord's deadline, for every command at once.

Discord drops an interaction the bot has not acknowledged within 3 seconds ("The application
did not respond"), and a command that reads the database, exports a channel, searches recall or
loads a model can take longer than that on a busy machine. So no command has to remember it:
`DeferringTree` (the bot's command tree) acknowledges every slash and context-menu command with
a private "thinking…" defer before any check or the command itself runs, and `say_privately`
then edits that placeholder into the answer (later answers are follow-ups). The only commands
that answer at once are the ones whose answer must be the first response, a form (modal): they
are marked `answers_at_once` and must answer quickly (they only read the database first).

Every command answers privately (ephemeral), so the defer is private too.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import discord
from discord import app_commands

from bot.discord.posting import NO_PINGS, describe_failure

log = logging.getLogger(__name__)

#: The `extras` key that marks a command answering with its first response (a modal).
AT_ONCE = "answers_at_once"
#: The `Interaction.extras` key set once a deferred placeholder was edited into an answer.
_EDITED = "answered_placeholder"

C = TypeVar("C", bound=app_commands.Command[Any, ..., Any] | app_commands.ContextMenu)


def answers_at_once(command: C) -> C:
    """Mark a command whose first response is the answer itself (a form): not deferred.

    Apply it above `@app_commands.command(...)` (or `context_menu`)."""
    command.extras[AT_ONCE] = True
    return command


def deferred(interaction: discord.Interaction) -> bool:
    """The interaction was acknowledged with a "thinking…" placeholder not yet answered."""
    return (
        interaction.response.type is discord.InteractionResponseType.deferred_channel_message
        and not interaction.extras.get(_EDITED)
    )


class DeferringTree(app_commands.CommandTree):
    """The bot's command tree: every command is deferred before it runs (see the module)."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.type is not discord.InteractionType.application_command:
            return True  # autocomplete answers with its choices
        command = interaction.command
        if command is not None and command.extras.get(AT_ONCE):
            return True
        try:
            await interaction.response.defer(ephemeral=True, thinking=True)
        except discord.HTTPException as exc:  # too late already: Discord dropped it
            log.warning(
                "could not acknowledge /%s in time: %s",
                command.qualified_name if command else "?",
                describe_failure(exc),
            )
            return False
        return True


async def say_privately(interaction: discord.Interaction, text: str, **kwargs: Any) -> None:
    """A private answer that never pings: the deferred placeholder edited into it, an
    ephemeral response when nothing was sent yet, or a follow-up after the answer.

    Takes `send_message`'s keywords (`file`, `embed`, `view`, ...)."""
    kwargs.setdefault("allowed_mentions", NO_PINGS)
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True, **kwargs)
    elif deferred(interaction):
        interaction.extras[_EDITED] = True
        if "file" in kwargs:
            kwargs["attachments"] = [kwargs.pop("file")]
        await interaction.edit_original_response(content=text, **kwargs)
    else:
        await interaction.followup.send(text, ephemeral=True, **kwargs)
