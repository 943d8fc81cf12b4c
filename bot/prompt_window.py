"""Fitting a conversation into the model's context window: token counts, the kept history, recall.

The prompt's text is built by `bot.prompt` (Alpaca, and every defusing rule) or by the model's
chat template (`bot.prompt_template`); this module decides *which* turns go in. It keeps the
newest turns that fit the budget, cuts an over-long current message in its middle, and keeps the
prompt's prefix stable across messages (`start_hint`, `slack`) so the engine's prefix cache
reuses it. `FittedPrompt` remembers what it was rendered from, so `with_recall` can add a recall
block after the history without refitting.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.prompt import (
    NO_CONTEXT,
    RESPONSE,
    Context,
    Turn,
    context_texts,
    render_chat,
    render_recall,
    render_system,
    render_turn,
    risky_lines,
)

#: Extra tokens counted per block: SentencePiece tokenises `###` at a text start (`▁###`) and after
#: a blank line (`##`,`#`) differently, so a block counted alone can be one or two tokens short of
#: the same block inside the whole prompt.
BLOCK_MARGIN = 2


class TokenCounter:
    """Counts tokens with the model's own tokenizer, caching the cost of block headers. `fmt`:
    the model's prompt format (`bot.prompt_format`), which every prompt fitted with this counter
    is rendered in; None is Alpaca, rendered by this module."""

    def __init__(self, count: Callable[[str], int], fmt: Any = None) -> None:
        self._count = count
        self.fmt = fmt if fmt is not None and fmt.templated else None
        self._overhead: dict[tuple[str, str], int] = {}

    def __call__(self, text: str) -> int:
        return self._count(text)

    def block(self, turn: Turn) -> int:
        """Tokens `turn` takes in a prompt: its cached content count plus its header's cost,
        plus two per line that defusing may quote (an upper bound: the rest of defusing only
        shortens the text)."""
        if turn.tokens is None:
            turn.tokens = self._count(turn.content.strip())
        quoted = risky_lines(turn.content.strip(), bool(turn.name)) if turn.role == "user" else 0
        key = (turn.role, turn.name)
        if (extra := self._overhead.get(key)) is None:
            render = self.fmt.turn_block if self.fmt else render_turn
            extra = self._count(render(turn.role, "x", turn.name)) - self._count("x")
            extra = self._overhead[key] = extra + BLOCK_MARGIN
        return turn.tokens + extra + 2 * quoted


@dataclass(slots=True)
class FittedPrompt:
    text: str
    turns: list[Turn]  # the history turns kept, oldest first, current message last
    dropped: bool  # some older history was left out by this fit (the window was cut)
    tokens: int  # estimated prompt tokens (an upper bound)
    truncated: bool = False  # the current message alone was too long and was cut
    start_id: int | None = None  # id of the oldest kept history turn: the hint for next time
    notes: list[str] = field(default_factory=list)
    system: str = ""  # what the text was rendered from, so `with_recall` can render it again
    post_history: str = ""
    recalled: list[Turn] = field(default_factory=list)  # turns recalled from beyond the window
    speakers: tuple[str, ...] = ()  # the bot's names the text was defused against
    older: bool = False  # history older than the window exists (cut now, or at `start_hint`)
    fmt: Any = None  # the prompt format it is rendered in (TokenCounter.fmt); None: Alpaca
    context: Context = NO_CONTEXT  # summary, members' cards, author's note (`bot.prompt`)


def with_recall(
    prompt: FittedPrompt, recalled: Sequence[Turn], count: Callable[[str], int], bot_name: str = ""
) -> FittedPrompt:
    """`prompt` with a recall block of `recalled` turns placed after the history.

    The caller made room for it: the history was fitted to the budget less the recall budget.
    """
    fmt = prompt.fmt
    now = next((t.when for t in reversed(prompt.turns) if t.when is not None), None)
    block = (fmt.render_recall if fmt else render_recall)(recalled, bot_name, now)
    if not block:
        return prompt
    prompt.text = (fmt.render_chat if fmt else render_chat)(
        prompt.system,
        prompt.turns,
        post_history=prompt.post_history,
        recall=block,
        speakers=prompt.speakers,
        context=prompt.context,
    )
    prompt.tokens += count(block) + BLOCK_MARGIN
    prompt.recalled = list(recalled)
    return prompt


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
    speakers: Iterable[str] = (),
    context: Context = NO_CONTEXT,
) -> FittedPrompt:
    """Keep the newest history turns that fit `budget` tokens, oldest dropped first.

    `history` is newest first (as memory reads it) and may be a lazy iterator: it is consumed
    only as far as needed. The current message is never dropped; if it alone is too long it is
    cut in the middle and `truncated` is set.

    Cache-friendly: when the window overflows, the history is cut down to `(1 - slack) * budget`
    at once rather than by one turn per message, and `start_hint` (the `start_id` returned last
    time) is honoured while the turns since it still fit, so the prompt's prefix stays stable
    for many messages. `speakers` are the bot's names, for `chat_segments`. `context`'s
    blocks (`bot.prompt.Context`) are counted whole before the history: every member's card,
    though only those speaking in the window are shown.
    """
    speakers, fmt = tuple(speakers), count.fmt
    head = fmt.head(system) if fmt else render_system(system)
    fixed = count(head) + BLOCK_MARGIN if head else 0
    fixed += count(fmt.reply_open if fmt else RESPONSE) + BLOCK_MARGIN
    block = fmt.system_block if fmt else render_system
    for text in (post_history, *context_texts(context, None, speakers)):
        if text.strip():
            fixed += count(block(text)) + BLOCK_MARGIN
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
    overflow = older = False
    turns_in = iter(history)
    for turn in turns_in:
        cost = count.block(turn)
        if used + cost > room:
            overflow = True
            break
        kept.append((turn, cost))
        used += cost
        if start_hint is not None and turn.id is not None and turn.id <= start_hint:
            # reached last time's start: keep exactly that window (older turns stay dropped)
            older = next(turns_in, None) is not None
            break
    if overflow:
        # Cut to (1 - slack) of the room in one go so the next prompts share this prefix.
        target = int(room * (1 - slack))
        while kept and used > target:
            used -= kept.pop()[1]
    kept.reverse()
    turns = [t for t, _ in kept]
    turns_all = [*turns, current] if current is not None else turns
    return FittedPrompt(
        text=(fmt.render_chat if fmt else render_chat)(
            system, turns_all, post_history=post_history, speakers=speakers, context=context
        ),
        turns=turns_all,
        dropped=overflow,
        tokens=fixed + cur_tokens + used,
        truncated=truncated,
        start_id=turns[0].id if turns else None,
        notes=notes,
        system=system,
        post_history=post_history,
        speakers=speakers,
        older=overflow or older,
        fmt=fmt,
        context=context,
    )
