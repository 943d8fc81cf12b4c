"""The one owner of the Alpaca prompt format.

Both the bot and `training/` import this module, so the text the model is trained on and the text
it is served are built by the same functions. Nous-Hermes-Llama2 uses the plain Alpaca layout from
its model card (no "Below is an instruction..." preamble); multi-turn chat follows SillyTavern's
Alpaca preset: system/persona text in an Input block, human turns in Instruction blocks as
`Name: text`, bot turns in Response blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

INSTRUCTION = "### Instruction:\n"
INPUT = "### Input:\n"
RESPONSE = "### Response:\n"
SEPARATOR = "\n\n"

#: Strings that end a reply: the model starting a new block. Names of other participants are added
#: per request (see `stop_strings`).
HEADER_STOPS = ("### Instruction", "### Input:", "### Response")

# A line that would read as a block header: any case, any spacing, optional extra #'s or colon.
_HEADER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)#{2,}[ \t]*(?P<word>instruction|input|response)\b[ \t]*:?",
    re.IGNORECASE | re.MULTILINE,
)
# Where a reply must be cut: a header anywhere at a line start (same tolerance as above).
_HEADER_CUT = re.compile(
    r"(?:^|\n)[ \t]*#{2,}[ \t]*(?:instruction|input|response)\b", re.IGNORECASE
)


def format_single(instruction: str, context: str = "") -> str:
    """The model card's prompt, byte for byte: with an Input block only when there is context."""
    if context:
        return f"{INSTRUCTION}{instruction}{SEPARATOR}{INPUT}{context}{SEPARATOR}{RESPONSE}"
    return f"{INSTRUCTION}{instruction}{SEPARATOR}{RESPONSE}"


def neutralize(text: str) -> str:
    """Defuse lines that would forge a block header, so nobody can inject turns.

    `### Response:` at a line start becomes `# Response:`: still readable, no longer a header
    the model was trained to treat as a turn boundary.
    """
    return _HEADER_LINE.sub(lambda m: f"{m.group('indent')}# {m.group('word')}:", text)


@dataclass(slots=True)
class Turn:
    """One message of a conversation as the prompt sees it."""

    role: str  # "user" | "assistant"
    content: str
    name: str = ""
    tokens: int | None = None  # cached token count of `content`, filled by memory
    id: int | None = None  # stable ordinal (memory row id) for cache-friendly fitting

    def render(self) -> str:
        return render_turn(self.role, self.content, self.name)


def render_turn(role: str, content: str, name: str = "") -> str:
    """One block, including its trailing blank line."""
    body = neutralize(content.strip())
    if role == "assistant":
        return f"{RESPONSE}{body}{SEPARATOR}"
    name = " ".join(name.split())  # a name can never smuggle in a line break (and a header)
    label = f"{name}: " if name else ""
    return f"{INSTRUCTION}{label}{body}{SEPARATOR}"


def render_system(text: str) -> str:
    return f"{INPUT}{neutralize(text.strip())}{SEPARATOR}" if text.strip() else ""


def chat_segments(
    system: str,
    turns: Sequence[Turn],
    *,
    open_response: bool = True,
    post_history: str = "",
) -> list[tuple[str, bool]]:
    """The conversation as (text, is_target) pieces.

    A target piece is an assistant reply body plus its blank line; everything else is prompt.
    Training masks on these pieces; the bot joins them. With `open_response` the text ends with
    the `### Response:` header that asks for the next reply. `post_history` (a persona's
    post_history_instructions) goes in an Input block after the history, as SillyTavern does.
    """
    pieces: list[tuple[str, bool]] = []
    if sys_block := render_system(system):
        pieces.append((sys_block, False))
    for turn in turns:
        if turn.role == "assistant":
            pieces.append((RESPONSE, False))
            pieces.append((neutralize(turn.content.strip()) + SEPARATOR, True))
        else:
            pieces.append((turn.render(), False))
    if post := render_system(post_history):
        pieces.append((post, False))
    if open_response:
        pieces.append((RESPONSE, False))
    return pieces


def render_chat(
    system: str, turns: Sequence[Turn], *, open_response: bool = True, post_history: str = ""
) -> str:
    pieces = chat_segments(system, turns, open_response=open_response, post_history=post_history)
    return "".join(text for text, _ in pieces)


# --------------------------------------------------------------------------------------------
# Fitting the history into the context window


#: Extra tokens counted per block: SentencePiece tokenises `###` at a text start (`▁###`) and after
#: a blank line (`##`,`#`) differently, so a block counted alone can be one or two tokens short of
#: the same block inside the whole prompt.
BLOCK_MARGIN = 2


class TokenCounter:
    """Counts tokens with the model's own tokenizer, caching the cost of block headers."""

    def __init__(self, count: Callable[[str], int]) -> None:
        self._count = count
        self._overhead: dict[tuple[str, str], int] = {}

    def __call__(self, text: str) -> int:
        return self._count(text)

    def block(self, turn: Turn) -> int:
        """Tokens `turn` takes in a prompt: its cached content count plus its header's cost."""
        if turn.tokens is None:
            turn.tokens = self._count(turn.content.strip())
        key = (turn.role, turn.name)
        if (extra := self._overhead.get(key)) is None:
            extra = self._count(render_turn(turn.role, "x", turn.name)) - self._count("x")
            extra = self._overhead[key] = extra + BLOCK_MARGIN
        return turn.tokens + extra


@dataclass(slots=True)
class FittedPrompt:
    text: str
    turns: list[Turn]  # the history turns kept, oldest first, current message last
    dropped: bool  # some older history was left out
    tokens: int  # estimated prompt tokens (an upper bound)
    truncated: bool = False  # the current message alone was too long and was cut
    start_id: int | None = None  # id of the oldest kept history turn: the hint for next time
    notes: list[str] = field(default_factory=list)


def cut_middle(text: str, count: Callable[[str], int], limit: int) -> str:
    """Shorten `text` to at most `limit` tokens by removing its middle, which is usually filler."""
    marker = "\n[…]\n"
    if count(text) <= limit:
        return text
    lo, hi = 0, len(text) // 2
    while lo < hi:  # longest keep-per-side that fits
        mid = (lo + hi + 1) // 2
        if count(text[:mid] + marker + text[len(text) - mid :]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + marker + text[len(text) - lo :]


def fit_prompt(
    system: str,
    history: Iterable[Turn],
    current: Turn | None,
    count: TokenCounter,
    budget: int,
    *,
    start_hint: int | None = None,
    slack: float = 0.25,
    post_history: str = "",
) -> FittedPrompt:
    """Keep the newest history turns that fit `budget` tokens, oldest dropped first.

    `history` is newest first (as memory reads it) and may be a lazy iterator: it is consumed
    only as far as needed. The current message is never dropped; if it alone is too long it is
    cut in the middle and `truncated` is set.

    Cache-friendly: when the window overflows, the history is cut down to `(1 - slack) * budget`
    at once rather than by one turn per message, and `start_hint` (the `start_id` returned last
    time) is honoured while the turns since it still fit, so the prompt's prefix stays stable
    for many messages.
    """
    fixed = count(render_system(system)) + BLOCK_MARGIN if system.strip() else 0
    fixed += count(RESPONSE) + BLOCK_MARGIN
    if post_history.strip():
        fixed += count(render_system(post_history)) + BLOCK_MARGIN
    notes: list[str] = []
    truncated = False
    cur_tokens = 0
    if current is not None:
        cur_tokens = count.block(current)
        room = budget - fixed
        if cur_tokens > room:
            overhead = cur_tokens - (current.tokens or 0)
            limit = max(room - overhead, 1)
            current = Turn(
                current.role,
                cut_middle(current.content, count, limit),
                current.name,
                None,
                current.id,
            )
            cur_tokens = count.block(current)
            truncated = True
            notes.append("Your message was too long for my context window, so I cut its middle.")
    room = budget - fixed - cur_tokens
    kept: list[tuple[Turn, int]] = []  # newest first
    used = 0
    overflow = False
    for turn in history:
        cost = count.block(turn)
        if used + cost > room:
            overflow = True
            break
        kept.append((turn, cost))
        used += cost
        if start_hint is not None and turn.id is not None and turn.id <= start_hint:
            break  # reached last time's start: keep exactly that window
    if overflow:
        # Cut to (1 - slack) of the room in one go so the next prompts share this prefix.
        target = int(room * (1 - slack))
        while kept and used > target:
            used -= kept.pop()[1]
    kept.reverse()
    turns = [t for t, _ in kept]
    turns_all = [*turns, current] if current is not None else turns
    return FittedPrompt(
        text=render_chat(system, turns_all, post_history=post_history),
        turns=turns_all,
        dropped=overflow,
        tokens=fixed + cur_tokens + used,
        truncated=truncated,
        start_id=turns[0].id if turns else None,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Cleaning what the model wrote


def stop_strings(other_names: Iterable[str] = ()) -> list[str]:
    """Stops for one request: block headers, and any other participant starting a line."""
    stops = list(HEADER_STOPS)
    stops += [f"\n{n}:" for n in dict.fromkeys(n.strip() for n in other_names) if n]
    return stops


def clean_reply(text: str, other_names: Iterable[str] = (), bot_name: str = "") -> str:
    """Cut a raw completion where the turn ends, and trim it.

    The turn ends at EOS (the engine stops there), at any block header, or where the model
    starts writing another participant's line. A leading `BotName:` the model echoes is dropped.
    """
    if m := _HEADER_CUT.search(text):
        text = text[: m.start()]
    names = [re.escape(n.strip()) for n in other_names if n and n.strip()]
    if names and (m := re.search(rf"(?:^|\n)[ \t]*(?:{'|'.join(names)})[ \t]*:", text)):
        text = text[: m.start()]
    text = text.replace("</s>", "")
    text = text.strip()
    if bot_name and text.lower().startswith(bot_name.lower() + ":"):
        text = text[len(bot_name) + 1 :].strip()
    return text


# --------------------------------------------------------------------------------------------
# Several speakers on the bot's side (scenes, a channel whose persona changed)


def seen_by(turns: Iterable[Turn], speaker: str) -> list[Turn]:
    """The turns as `speaker` (a persona's name) should see them: only its own replies stay
    Response blocks; a reply another persona (or the plain assistant) wrote becomes a named
    line of that speaker, like a member's message, so no persona is shown another's words as
    its own turns. Replies without a name (older memory) are kept as the speaker's own.

    Names compare as the prompt shows them (spacing and case ignored). Returns new `Turn`s;
    the order (newest first or oldest first) is kept.
    """
    own = " ".join(speaker.split()).casefold()
    out: list[Turn] = []
    for turn in turns:
        name = " ".join(turn.name.split())
        if turn.role == "assistant" and name and name.casefold() != own:
            turn = replace(turn, role="user")
        out.append(turn)
    return out
