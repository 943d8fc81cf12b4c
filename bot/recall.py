"""Long-term recall: find what was said before the context window, in the channel's own history.

The prompt holds the newest turns that fit the window; everything older is still in SQLite. When
the history did not fit, `recall` searches the older turns of the channel (the FTS5 index in
`bot.store.turns`, BM25-ranked) for the words of the new message and the turns just before it, and
returns the best few hits with one turn of context each, within a token budget, oldest first.
No embedding model and no extra service: SQLite ships full-text search.

This module chooses *what* to recall; `bot.prompt.render_recall` owns how it reads in the
prompt (and defuses it like any other untrusted text).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import replace

from bot.memory import Memory
from bot.settings import Settings
from bot.store.turns import StoredTurn

#: Words that say nothing about what to look for. Short and English-centred on purpose: BM25
#: already discounts common words; this only keeps them from crowding out the useful terms.
_STOPWORDS_TEXT = """a about after again all also am an and any are as at be because been before being but by
    can could did do does doing done for from had has have having he her here hers him his how i
    if in into is it its just me my myself no nor not now of off on once only or other our ours
    out over own please same she should so some such than that the their them then there these
    they this those to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself hey hi hello ok okay yes yeah tell know remember
    said say says think thing things again earlier ago"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
_WORD = re.compile(r"\w+", re.UNICODE)
#: The bot's own notices ("*(I had nothing to say...)*"): never worth recalling.
_NOTICE = re.compile(r"^\*\(.*\)\*$", re.DOTALL)
#: Most query terms used; the new message's come first.
MAX_TERMS = 24
#: Most terms searched for: the ones the window uses least (see `rare_terms`).
SEARCH_TERMS = 6
#: A word in more window turns than this is too common to search for.
COMMON_IN_WINDOW = 2
#: A message with fewer content words than this is searched together with the turns before it.
MIN_TERMS = 2
#: Most search hits considered before the budget and de-duplication pick the final few.
CANDIDATES = 24
#: Per-turn overhead (name, line break, date) added to a turn's cached token count.
TURN_OVERHEAD = 12
#: Fewest tokens of text worth showing as an excerpt of a hit too long for the budget.
MIN_EXCERPT = 8
#: Most words (FTS5 tokens) in an excerpt: SQLite's `snippet()` shows at most 64.
MAX_EXCERPT_WORDS = 64


def recall_tokens(settings: Settings) -> int:
    """Tokens of the window given to recalled turns: RECALL_TOKENS, or a tenth of
    CONTEXT_TOKENS when it is 0 (`settings` as the channel has them)."""
    return settings.recall_tokens or int(settings.context_tokens) // 10


def query_terms(texts: Sequence[str], max_terms: int = MAX_TERMS) -> list[str]:
    """Distinct content words of `texts`, in order (the first text's words first)."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in _WORD.findall(text.casefold()):
            if (len(word) > 2 or word.isdigit()) and word not in STOPWORDS:
                seen.setdefault(word, None)
    return list(seen)[:max_terms]


def rare_terms(words: Sequence[str], window: Iterable[str]) -> list[str]:
    """The `SEARCH_TERMS` of `words` least used in `window` (the texts already in the prompt).

    The window is a free sample of how the channel talks: a word in many of its turns is
    common here, matches thousands of older turns, costs time to rank and finds nothing in
    particular, while a word the window never uses points at something said long ago.
    """
    if not words:
        return []
    counts = dict.fromkeys(words, 0)
    for text in window:
        for word in _words(text) & counts.keys():
            counts[word] += 1
    ranked = sorted(words, key=lambda w: (counts[w], -len(w)))
    return [w for w in ranked if counts[w] <= COMMON_IN_WINDOW][:SEARCH_TERMS]


def match_expression(terms: Sequence[str]) -> str:
    """An FTS5 query that matches any of `terms`. Each is quoted, so no user text is syntax."""
    return " OR ".join(f'"{term}"' for term in terms)


@functools.lru_cache(maxsize=8192)
def _words(text: str) -> frozenset[str]:
    """The distinct words of `text`; cached, since the window's turns recur message after message."""
    return frozenset(_WORD.findall(text.casefold()))


def _boilerplate(turn: StoredTurn) -> bool:
    text = turn.content.strip()
    return not text or (turn.role == "assistant" and bool(_NOTICE.match(text)))


def _near_duplicate(words: frozenset[str], chosen: list[frozenset[str]]) -> bool:
    for other in chosen:
        union = len(words | other)
        if union and len(words & other) / union >= 0.8:
            return True
    return False


def cost(turn: StoredTurn) -> int:
    """A turn's estimated prompt tokens: its cached count when known, else chars / 3."""
    return (turn.tokens if turn.tokens is not None else len(turn.content) // 3) + TURN_OVERHEAD


async def recall(
    memory: Memory,
    channel_id: int,
    query: Sequence[str],
    *,
    before_id: int | None,
    budget_tokens: int,
    window: Sequence[str] = (),
    exclude_authors: Collection[int] = (),
    shown_cost: Callable[[StoredTurn], int] | None = None,
) -> list[StoredTurn]:
    """Turns worth showing from before `before_id` (the oldest turn in the window), oldest first.

    `query` is the new message followed by the turns just before it; `window` the history
    texts already in the prompt. The message's words that the window rarely uses are searched
    for, and the earlier turns' words too only when it has fewer than
    `MIN_TERMS` ("and what about the other one?"), since chatter around a question mostly
    matches more chatter. Hits come best first from the index; each is kept with the turn before
    it as context while the estimated tokens fit `budget_tokens`. A hit too long for what is
    left is shown as an excerpt (`excerpt`: FTS5's `snippet()` around the matched words, as many
    as fit), with the turn before it only if that fits too, so a fact inside a long message is
    recalled however long the message. Blocked members' turns, the bot's notices and
    near-duplicates of an already chosen hit are skipped. Empty when the index is off or
    nothing matches. `shown_cost` (a turn's tokens as the prompt will show it) sizes excerpts
    exactly; without it they are estimated like every other turn (`cost`).
    """
    if budget_tokens <= 0:
        return []
    terms = rare_terms(query_terms(query[:1]), window)
    if len(terms) < MIN_TERMS:
        terms = rare_terms(query_terms(query), window)
    if not terms:
        return []
    match = match_expression(terms)
    hits = await memory.turns.search(channel_id, match, before_id=before_id, limit=CANDIDATES)
    chosen: dict[int, StoredTurn] = {}
    chosen_words: list[frozenset[str]] = []
    used = 0
    for hit, context in hits:
        if hit.id in chosen or hit.author_id in exclude_authors or _boilerplate(hit):
            continue
        words = _words(hit.content)
        if _near_duplicate(words, chosen_words):
            continue
        group = [hit]
        if (
            context is not None
            and context.id not in chosen
            and context.author_id not in exclude_authors
            and not _boilerplate(context)
        ):
            group.insert(0, context)
        price = sum(cost(t) for t in group)
        if used + price > budget_tokens:
            if used + cost(hit) > budget_tokens:
                short = await excerpt(memory, hit, match, budget_tokens - used, shown_cost)
                if short is None:
                    continue  # a smaller hit further down may still fit
                hit = short
                group = [context, hit] if group[0] is context else [hit]
                if used + sum(cost(t) for t in group) > budget_tokens:
                    group = [hit]
            else:
                group = [hit]
            price = sum(cost(t) for t in group)
        used += price
        chosen_words.append(words)
        for turn in group:
            chosen[turn.id] = turn
    return [chosen[i] for i in sorted(chosen)]


async def excerpt(
    memory: Memory,
    hit: StoredTurn,
    match: str,
    room: int,
    shown_cost: Callable[[StoredTurn], int] | None = None,
) -> StoredTurn | None:
    """`hit` cut to the words around what `match` found in it (FTS5 `snippet()`, "…" where text
    was left out), costing at most `room` tokens as shown (`shown_cost`, else `cost`); None when
    not even `MIN_EXCERPT` tokens of text fit. Same id and speaker: it reads as the hit."""
    measure = shown_cost or cost
    if room - TURN_OVERHEAD < MIN_EXCERPT:
        return None
    words = min(MAX_EXCERPT_WORDS, room)
    while words >= 1:
        text = await memory.turns.snippet(hit.id, match, words)
        if not text:
            return None
        short = replace(hit, content=text, tokens=None)
        if (price := measure(short)) <= room:
            return short
        words = min(words - 1, words * room // price)
    return None
