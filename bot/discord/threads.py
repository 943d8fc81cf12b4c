"""Auto-threads: in a `threads` channel (`bot.policy.MODES`) a message addressed to the bot opens
a public thread from it, and the reply and the rest of the conversation go on there.

Why: in a busy channel several conversations with the bot interleave and each one's context is
polluted by the others (oobabot #6, llmcord #19); a thread per conversation keeps each one apart
and the channel readable. The thread has its own memory and inherits the channel's settings and
persona through the channel policy (`bot.policy`, the one place threads inherit), where a
thread of a `threads` channel answers every message.

Part of the Discord layer.
"""

from __future__ import annotations

import logging

import discord

log = logging.getLogger(__name__)

#: Discord's longest thread name.
THREAD_NAME_MAX = 100


def thread_name(text: str, author: str) -> str:
    """The thread's name: the message's first non-empty line, trimmed to Discord's limit with an
    ellipsis; the author's name when the message has no words (an attachment, a bare mention)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        line = f"Chat with {author.strip() or 'someone'}"
    if len(line) > THREAD_NAME_MAX:
        line = line[: THREAD_NAME_MAX - 1].rstrip() + "…"
    return line


async def open_thread(message: discord.Message, text: str) -> discord.Thread | None:
    """A public thread started from `message`, named from `text`; None when Discord refuses (no
    Create Public Threads permission, a thread already started there): the reply then goes in
    the channel, as in `mention` mode."""
    name = thread_name(text, message.author.display_name)
    try:
        return await message.create_thread(name=name)
    except discord.HTTPException as exc:
        log.warning(
            "could not open a thread in channel %s (%s); answering in the channel",
            message.channel.id,
            exc.text or exc.status,
        )
        return None
