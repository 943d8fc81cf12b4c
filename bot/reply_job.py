"""One reply's request: `ReplyJob`, what `Conversations.prepare` builds and the runner
generates, shows and stores; and `reopen_last_reply`, which turns a prompt into one that
continues the last reply (/continue).

Kept apart from `bot.conversation` so the job's own small behaviour (stopping it half-way)
lives with it. Nothing here knows about discord.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bot.engine import EngineRequest, GenerationParams, ReplyStats
from bot.prompt_template import ALPACA, AlpacaFormat, TemplateFormat
from bot.prompt_window import FittedPrompt
from bot.store.images import Image


@dataclass(slots=True)
class ReplyJob:
    """Everything needed to generate and store one reply."""

    channel_id: int
    guild_id: int | None
    prompt: FittedPrompt
    params: GenerationParams
    other_names: list[str]
    bot_name: str
    persona: str | None
    reply_to: int | None  # turn id of the message being answered
    cache_key: str = ""  # the engine's prompt-cache slot; one per channel and speaker
    text: str = ""
    stats: ReplyStats | None = None
    notes: list[str] = field(default_factory=list)
    #: the engine request generating it now (None before and between attempts)
    request: EngineRequest | None = None
    #: a member stopped it (`stop`): what was written so far is the reply
    stopped: bool = False
    #: VISION: the images of the window's turns, by turn id (sent as image parts)
    images: dict[int, list[Image]] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop generating: the engine drops the request at its next step (one decode step at
        most), and the text written so far becomes the reply (`stream` ends with it)."""
        self.stopped = True
        if self.request is not None:
            self.request.cancel()


def reopen_last_reply(prompt: FittedPrompt, fmt: AlpacaFormat | TemplateFormat = ALPACA) -> bool:
    """Make `prompt` continue its last reply instead of asking for a new one; False if the
    last turn is not the bot's.

    Drops the reply's end and the next reply's opening (Alpaca: "\\n\\n### Response:\\n"; a
    template: its end-of-turn token and generation prompt), so the model writes on from the
    reply's last word, the assistant message left open.
    """
    tail = fmt.reply_end + fmt.reply_open
    if not (prompt.turns and prompt.turns[-1].role == "assistant" and prompt.text.endswith(tail)):
        return False
    prompt.text = prompt.text[: -len(tail)]
    return True
