"""Chats laid out for training exactly as the bot serves them, built by the bot's own functions.

For every reply of a conversation this asks the bot's prompt builder for the prompt the bot
sends for that reply: `bot.prompt_window.fit_prompt` with the system text for the plain
assistant, or `bot.personas.build_persona_prompt` for a persona (system prompt, definitions,
triggered lore, example dialogue, the named history, post-history instructions). The replies are
then laid out as training examples: a reply whose prompt extends the text so far joins the
current example (as one more target), and one whose prompt does not (a persona's post-history
block sits after the history, new lore is triggered) starts a new example. Either way the text before each target is
byte for byte the prompt the bot sends for that reply, and the target is the reply as the bot's
history shows it (`neutralize`d, then a blank line; in a chat template, the defused reply and
its end-of-turn token: the format the counter carries, `TokenCounter.fmt`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bot.card_files import parse_card
from bot.cards import CardError
from bot.personas import (
    Persona,
    PersonaTable,
    build_persona_prompt,
    load_builtin_personas,
    load_persona_file,
)
from bot.prompt import SEPARATOR, Turn, neutralize
from bot.prompt_window import FittedPrompt, TokenCounter, fit_prompt

#: The prompt for one reply: (history newest first, the message answered or None) -> prompt.
Server = Callable[[list[Turn], Turn | None], FittedPrompt]

Pieces = list[tuple[str, bool]]


def plain_server(system: str, count: TokenCounter, budget: int) -> Server:
    """The bot without a persona: its SYSTEM_PROMPT in an Input block, the named history."""

    def serve(history: list[Turn], current: Turn | None) -> FittedPrompt:
        return fit_prompt(system, history, current, count, budget)

    return serve


def persona_server(persona: Persona, count: TokenCounter, budget: int) -> Server:
    """The bot playing `persona`, as `bot.conversation.Conversations.prepare` builds it."""

    def serve(history: list[Turn], current: Turn | None) -> FittedPrompt:
        speaker = current.name if current is not None else ""
        return build_persona_prompt(persona, history, current, speaker, count, budget)

    return serve


@dataclass(slots=True)
class ServedExample:
    """One training example: its pieces (prompt text, targets) and how many turns it spans."""

    pieces: Pieces
    end: int  # turns[:end] are in it; the last one is its last target


def served_examples(
    turns: Sequence[Turn],
    server_for: Callable[[Turn], Server | None],
    *,
    skip_target: Callable[[Turn], bool] = lambda _: False,
) -> list[ServedExample]:
    """Every reply after the first human turn, with the prompt the bot builds for it.

    A reply answers the human turn right before it (`current`); a reply that follows another
    reply is asked for with no current message, as the bot's continue does. `server_for` gives
    the builder a reply was written with (None: the reply is kept as history only), and
    `skip_target` marks replies that stay history but are not trained (the bot's notices).
    """
    examples: list[ServedExample] = []
    pieces: Pieces = []
    text = ""
    end = 0
    for i, turn in enumerate(turns):
        if turn.role != "assistant" or not any(t.role == "user" for t in turns[:i]):
            continue
        server = server_for(turn)
        if server is None or skip_target(turn):
            continue
        before = [replace(t) for t in turns[:i]]  # the builder names the persona's turns
        current = before.pop() if before[-1].role == "user" else None
        served = server(before[::-1], current)
        prompt = served.text
        fmt = served.fmt
        body = fmt.reply_body(turn.content) if fmt else neutralize(turn.content.strip()) + SEPARATOR
        if pieces and prompt.startswith(text):
            pieces.append((prompt[len(text) :], False))
        else:
            if pieces:
                examples.append(ServedExample(pieces, end))
            pieces = [(prompt, False)]
        pieces.append((body, True))
        text, end = prompt + body, i + 1
    if pieces:
        examples.append(ServedExample(pieces, end))
    return examples


# --------------------------------------------------------------------------------------------
# Finding a persona's card


def load_card_file(path: Path) -> Persona:
    """A persona from a card file: the bot's persona YAML, or a Card V1/V2/V3 JSON or PNG."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return load_persona_file(path)[0]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CardError(f"cannot read {path}: {exc.strerror or exc}") from None
    return Persona(parse_card(data, path.name), path=path)


def persona_table(card_files: Sequence[str] = ()) -> PersonaTable:
    """The shipped personas (PERSONAS_DIR's folder) plus `card_files`, which win on a name."""
    table, _ = load_builtin_personas()
    for name in card_files:
        table.add(load_card_file(Path(name)))
    return table


def find_persona(ref: str) -> Persona:
    """A source's `persona:`: a card file if such a file exists, else a shipped persona's name."""
    path = Path(ref)
    if path.is_file():
        return load_card_file(path)
    table = persona_table()
    if ref not in table:
        known = ", ".join(sorted(p.name for p in table.values())) or "none"
        raise CardError(f"no persona file or shipped persona named {ref!r} (shipped: {known})")
    return table[ref]
