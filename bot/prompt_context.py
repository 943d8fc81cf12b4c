"""What a channel's prompt holds besides its turns, read from memory and fitted to its budgets.

- Notes (`/note add`): always in the prompt, as the system text's last paragraph, oldest first
  within `NOTES_TOKENS` (the newest are left out when they do not fit).
- The rolling summary (`bot.summaries`): a block after the history, before recall, at most
  `SUMMARY_TOKENS`.
- Members' cards (`/me describe`): of the members speaking in the window, the latest speakers
  first, within `MEMBER_CARDS_TOKENS`.
- The author's note (`AUTHORS_NOTE`, usually set per channel) `AUTHORS_NOTE_DEPTH` turns before
  the end.

This module only chooses and measures; `bot.prompt` defuses and lays the texts out, in Alpaca
or the model's chat template alike (`bot.prompt.Context`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.memory import Memory
from bot.prompt import Context, Turn, notes_text, one_line
from bot.prompt_window import cut_middle
from bot.settings import Settings

Count = Callable[[str], int]


def notes_that_fit(notes: Sequence[str], count: Count, budget: int) -> int:
    """How many of `notes` (oldest first) fit `budget` tokens together: the prompt holds these."""
    kept = 0
    for i in range(1, len(notes) + 1):
        if count(notes_text(notes[:i])) > budget:
            break
        kept = i
    return kept


def place_of_cards(channel_id: int, guild_id: int | None) -> int:
    """Where members' cards are kept: per server, or per DM channel outside one."""
    return guild_id if guild_id is not None else channel_id


async def channel_notes(memory: Memory, channel_id: int, count: Count, budget: int) -> str:
    """The notes paragraph of the system text (empty without notes or budget)."""
    notes = [n.text for n in await memory.notes.list(channel_id)]
    return notes_text(notes[: notes_that_fit(notes, count, budget)]) if notes and budget else ""


async def prompt_context(
    memory: Memory,
    settings: Settings,
    count: Count,
    channel_id: int,
    guild_id: int | None,
    turns: Sequence[Turn],
) -> Context:
    """The summary, cards and author's note for a prompt whose candidate turns (newest first)
    are `turns`; `settings` as in force in the channel."""
    summary = ""
    if (stored := await memory.summaries.get(channel_id)) is not None:
        summary = cut_middle(stored.text.strip(), count, settings.summary_tokens)
    speakers: dict[int, str] = {}
    for turn in turns:
        if turn.role == "user" and turn.author is not None:
            speakers.setdefault(turn.author, turn.name)
    cards: list[tuple[int, str, str]] = []
    if speakers and settings.member_cards_tokens:
        found = await memory.member_cards.of(place_of_cards(channel_id, guild_id), [*speakers])
        used = 0
        for member, name in speakers.items():
            if (text := found.get(member)) is None:
                continue
            cost = count(f"- {name}: {one_line(text)}") + 1
            if used + cost > settings.member_cards_tokens:
                break
            cards.append((member, name, text))
            used += cost
    return Context(
        summary=summary,
        cards=tuple(cards),
        note=settings.authors_note,
        note_depth=settings.authors_note_depth,
    )
