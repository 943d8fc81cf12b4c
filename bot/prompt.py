"""The one owner of the Alpaca prompt format.

Both the bot and `training/` import this module, so the text the model is trained on and the text
it is served are built by the same functions. Nous-Hermes-Llama2 uses the plain Alpaca layout from
its model card (no "Below is an instruction..." preamble); multi-turn chat follows SillyTavern's
Alpaca preset: system/persona text in an Input block, human turns in Instruction blocks as
`Name: text`, bot turns in Response blocks.

It is also the one place untrusted text (messages, names, cards, lore) is defused, and the reply
cleaner cuts the model's text by the same rules. Which turns fit the context window is decided
in `bot.prompt_window`; the model's own chat template is rendered by `bot.prompt_template`.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bot.textfold import (
    BREAKS,
    COLON_CHARS,
    fold,
    fold_colons,
    lines,
    normalize_text,
    speaker_key,
)

INSTRUCTION = "### Instruction:\n"
INPUT = "### Input:\n"
RESPONSE = "### Response:\n"
SEPARATOR = "\n\n"

#: Strings that end a reply: the model starting a new block, in the cases a model writes it.
#: Names of other participants are added per request (see `stop_strings`). These are an
#: optimisation (kept to 12 so an OpenAI-compatible server, which takes 16, also gets a few
#: names): `clean_reply` is what guarantees no header line reaches a stored reply.
HEADER_STOPS = (
    "### Instruction",
    "### Input:",
    "### Response",
    "### instruction",
    "### input:",
    "### response",
    "### INSTRUCTION",
    "### INPUT:",
    "### RESPONSE",
    "###Instruction",
    "###Input:",
    "###Response",
)

# --------------------------------------------------------------------------------------------
# Untrusted text: one normalisation, one header rule, one speaker rule
#
# Message text, display names, persona and card fields, lore and attachment names are stored as
# they came and defused here, when a prompt is rendered. Three steps:
# 1. `normalize_text`: every Unicode line break becomes "\n"; format characters (category Cf:
#    zero-width, bidi controls, tag characters), other control characters and lone surrogates are
#    dropped. A zero-width (non-)joiner is kept only between two non-ASCII characters (emoji
#    sequences, Indic scripts), where it cannot hide anything the folded comparison would miss.
# 2. `is_header_line`: a line is a block header when its folded form (`fold`: NFKD, marks and Cf
#    dropped, NFKC, case-folded, invisible fillers as spaces) is two or more `#` (spaces allowed
#    between them) and a header word. Such lines are rewritten as `# Word...` (`neutralize`).
# 3. `starts_as_speaker`: a line starts as a participant's turn when its `speaker_key` (the fold
#    with all spaces, Markdown emphasis and colon look-alikes unified, then its UTS #39 confusable
#    skeleton, `bot.textfold`) starts with `name:`. The names are everyone the bot knows in the
#    place, not only who speaks in the window (`bot.speakers`): the bot, the personas of the
#    channel and its scene, and every member's display, global and user name. In members' text,
#    card fields and lore such a line is rendered as a Markdown quote, `> Name: ...`; the reply
#    cleaner cuts the model's reply at the same lines. A line that merely looks like a label
#    (`Note:`, `Step 1:`) matches no one and is left alone.

# Quick rejection: the only characters whose fold holds a `#` (checked over all of Unicode).
_HASH_CHARS = re.compile("[#\uff03\ufe5f]")
_COLON_CHARS = COLON_CHARS
_BREAKS = BREAKS
_HEADER_FOLDED = re.compile(r"\s*#(?:\s*#)+\s*(?:instruction|input|response)(?!\w)")
# The plain ASCII header forms, rewritten in place so the line stays readable.
_HEADER_LINE = re.compile(
    r"^(?P<indent>[ \t]*)#{2,}[ \t]*(?P<word>instruction|input|response)\b[ \t]*:?",
    re.IGNORECASE,
)


def is_header_line(line: str) -> bool:
    """Would this line read as an Alpaca block header (in any case, width or disguise)?"""
    return _HASH_CHARS.search(line) is not None and _HEADER_FOLDED.match(fold(line)) is not None


def _defuse_header_line(line: str) -> str:
    if m := _HEADER_LINE.match(line):
        line = f"{m.group('indent')}# {m.group('word')}:{line[m.end() :]}"
    if is_header_line(line):  # a disguised form: drop everything before the word
        i = 0
        while i < len(line) and fold(line[i]).strip(" \t#") == "":
            i += 1
        line = "# " + line[i:]
    return line


@functools.lru_cache(maxsize=4096)
def neutralize(text: str) -> str:
    """Normalise `text` and defuse every line that would read as a block header.

    `### Response:` at a line start becomes `# Response:`: still readable, no longer a header
    the model was trained to treat as a turn boundary. Disguised forms (full-width, zero-width
    characters, marks, exotic spaces or line breaks) become `# ` and the rest of the line.
    """
    return "\n".join(
        _defuse_header_line(line) if _HASH_CHARS.search(line) else line
        for line in normalize_text(text).split("\n")
    )


@functools.lru_cache(maxsize=4096)
def clean_name(name: str) -> str:
    """A participant's name as the prompt shows it: one line, no colon, never a header."""

    def one_line(text: str) -> str:
        text = text.replace(":", " ") if text.isascii() else "".join(map(_no_colon, text))
        return " ".join(text.split())

    name = one_line(normalize_text(name))
    # A defused header starts with a single `#`: removing its colon cannot make it one again.
    return one_line(_defuse_header_line(name)) if is_header_line(name) else name


def _is_colon(ch: str) -> bool:
    return ":" in fold_colons(fold(ch))


def _no_colon(ch: str) -> str:
    return " " if _is_colon(ch) else ch


def speaker_keys(names: Iterable[str]) -> tuple[str, ...]:
    """The `name:` prefixes `starts_as_speaker` looks for, one per distinct non-empty name."""
    return _speaker_keys(tuple(names))


@functools.lru_cache(maxsize=1024)
def _speaker_keys(names: tuple[str, ...]) -> tuple[str, ...]:
    keys = (speaker_key(clean_name(n)) for n in names if n)
    return tuple(dict.fromkeys(f"{k}:" for k in keys if k))


def starts_as_speaker(line: str, keys: tuple[str, ...]) -> bool:
    """THE speaker rule: does `line` start like one of the participants' `Name:` (`keys` from
    `speaker_keys`)? Used both to defuse members' lines and to cut the model's reply."""
    return bool(keys) and bool(_COLON_CHARS.search(line)) and speaker_key(line).startswith(keys)


def other_speakers(names: Iterable[str], bot_name: str) -> list[str]:
    """The participants other than the bot, as the prompt names them, one per speaker key."""
    own = speaker_key(clean_name(bot_name))
    out: dict[str, str] = {}
    for name in names:
        shown = clean_name(name) if name else ""
        if (key := speaker_key(shown)) and key != own:
            out.setdefault(key, shown)
    return list(out.values())


def defuse_turn(content: str, speakers: Iterable[str] = (), *, labelled: bool = True) -> str:
    """A member's message ready for its Instruction block: normalised, header lines defused, and
    every line that starts like a participant's `Name:` quoted (`> Name: ...`) so it cannot read
    as that speaker's turn. With `labelled` the first line follows the member's own `name: `
    label and is left as it is."""
    keys = speaker_keys(speakers)
    out = []
    for i, line in enumerate(neutralize(content).split("\n")):
        if (i or not labelled) and starts_as_speaker(line, keys):
            line = f"> {line}"
        out.append(line)
    return "\n".join(out)


def risky_lines(content: str, labelled: bool) -> int:
    """Lines `defuse_turn` may prefix with `> ` (a colon early in the line): an upper bound the
    window fitting (`bot.prompt_window.TokenCounter.block`) adds to a turn's token estimate."""
    if not _COLON_CHARS.search(content):
        return 0
    return sum(bool(_COLON_CHARS.search(line[:80])) for line in lines(content)[int(labelled) :])


def format_single(instruction: str, context: str = "") -> str:
    """The model card's prompt, byte for byte: with an Input block only when there is context."""
    if context:
        return f"{INSTRUCTION}{instruction}{SEPARATOR}{INPUT}{context}{SEPARATOR}{RESPONSE}"
    return f"{INSTRUCTION}{instruction}{SEPARATOR}{RESPONSE}"


@dataclass(slots=True)
class Turn:
    """One message of a conversation as the prompt sees it."""

    role: str  # "user" | "assistant"
    content: str
    name: str = ""
    tokens: int | None = None  # cached token count of `content`, filled by memory
    id: int | None = None  # stable ordinal (memory row id) for cache-friendly fitting
    when: float | None = field(default=None, compare=False)  # unix time said (recall shows it)
    author: int | None = field(default=None, compare=False)  # the member's id (`bot.speakers`)

    def render(self, speakers: Iterable[str] = ()) -> str:
        return render_turn(self.role, self.content, self.name, speakers)


def render_turn(role: str, content: str, name: str = "", speakers: Iterable[str] = ()) -> str:
    """One block, including its trailing blank line.

    A member's block is `Name: text`: the name made single-line and header-free (`clean_name`),
    the text defused against headers and against lines forging one of `speakers` (`defuse_turn`).
    Cached: a channel's turns are rendered again for every prompt while they stay in the window.
    """
    return _render_turn(role, content, name, tuple(speakers))


@functools.lru_cache(maxsize=4096)
def _render_turn(role: str, content: str, name: str, speakers: tuple[str, ...]) -> str:
    if role == "assistant":
        return f"{RESPONSE}{neutralize(content.strip())}{SEPARATOR}"
    name = clean_name(name)
    body = defuse_turn(content.strip(), speakers, labelled=bool(name))
    label = f"{name}: " if name else ""
    return f"{INSTRUCTION}{label}{body}{SEPARATOR}"


def participants(turns: Iterable[Turn], speakers: Iterable[str] = ()) -> list[str]:
    """Everyone who may speak in a prompt: `speakers` (the bot, the persona) and every member
    with a turn in it, as the prompt names them."""
    names = [*speakers, *(t.name for t in turns if t.role == "user")]
    return list(dict.fromkeys(n for n in map(clean_name, names) if n))


def render_system(text: str) -> str:
    return f"{INPUT}{neutralize(text.strip())}{SEPARATOR}" if text.strip() else ""


#: The line that opens the recall block, so the model reads it as memory, not as the current talk.
RECALL_HEADING = "From earlier in this channel (recalled, oldest first):"


def ago(then: float, now: float) -> str:
    """How long before `now` a turn was said, in the largest whole unit: `3 days ago`."""
    seconds = max(0.0, now - then)
    for unit, size in (("year", 31_557_600), ("week", 604_800), ("day", 86_400),
                       ("hour", 3_600), ("minute", 60)):  # fmt: skip
        if (n := int(seconds // size)) >= 1:
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "moments ago"


def render_recall(turns: Sequence[Turn], bot_name: str = "", now: float | None = None) -> str:
    """Turns recalled from beyond the window, as one Input block (empty when there are none).

    One line per turn, `[YYYY-MM-DD, 3 days ago] Name: text` (how long before `now`, the time of
    the message being answered), with the text on one line and defused like any other untrusted
    text, so a recalled message can neither forge a header nor a turn. A turn recalled as an
    excerpt (`bot.recall.excerpt`) shows "…" where its text was left out.
    """
    return f"{INPUT}{text}{SEPARATOR}" if (text := recall_text(turns, bot_name, now)) else ""


def recall_text(turns: Sequence[Turn], bot_name: str = "", now: float | None = None) -> str:
    """The recall block's defused lines, whatever format wraps them (empty without turns)."""
    if not turns:
        return ""
    lines = [RECALL_HEADING, *(recall_line(turn, bot_name, now) for turn in turns)]
    return neutralize(chr(10).join(lines))


def recall_line(turn: Turn, bot_name: str = "", now: float | None = None) -> str:
    """One recalled turn's line in `render_recall`'s block (before defusing)."""
    day = time.strftime("%Y-%m-%d", time.gmtime(turn.when)) if turn.when else ""
    if day and now is not None:
        day = f"{day}, {ago(turn.when or 0.0, now)}"
    day = f"[{day}] " if day else ""
    name = clean_name(turn.name if turn.role == "user" else (turn.name or bot_name))
    text = " ".join(turn.content.split())
    return f"{day}{name + ': ' if name else ''}{text}"


# --------------------------------------------------------------------------------------------
# What a prompt holds besides the system text and the turns
#
# A channel's notes (`/note`), its rolling summary, the cards of the members speaking (`/me
# describe`) and the author's note are untrusted text like any message: they are defused here,
# each in the one way its block needs, whatever format wraps them. Notes join the system text
# (they change only by command, so the cached prefix stays); the summary, the members' cards
# and the author's note are blocks after the history (SillyTavern's "in-chat @ depth"), so the
# history stays the prefix the engine's cache reuses.

NOTES_HEADING = "Notes for this channel (keep them in mind):"
SUMMARY_HEADING = "Summary of the earlier conversation in this channel:"
CARDS_HEADING = "About the members speaking here (as they describe themselves):"


@dataclass(frozen=True, slots=True)
class Context:
    """The blocks of a prompt besides its system text and turns, as stored (raw text)."""

    summary: str = ""  # the channel's rolling summary
    cards: tuple[tuple[int, str, str], ...] = ()  # (member id, name, card), newest speaker first
    note: str = ""  # the author's note
    note_depth: int = 0  # how many turns before the end it goes (0: after the history)


NO_CONTEXT = Context()


def one_line(text: str) -> str:
    """Untrusted text normalised and folded onto one line."""
    return " ".join(normalize_text(text).split())


def notes_text(notes: Sequence[str]) -> str:
    """The notes as the system text's last paragraph, one `- ` line each (empty without notes):
    one line each, so no note can start a line as a speaker or a header."""
    if not (kept := [line for n in notes if (line := one_line(n))]):
        return ""
    return neutralize("\n".join([NOTES_HEADING, *(f"- {n}" for n in kept)]))


def transcript_text(turns: Sequence[Turn]) -> str:
    """Turns as the summarizer reads them (`bot.summaries`): one `Name: text` line each, the
    text folded onto its line and defused, so no turn can start a line as another speaker."""
    rows = []
    for turn in turns:
        name = clean_name(turn.name)
        rows.append(f"{name}: {one_line(turn.content)}" if name else one_line(turn.content))
    return neutralize("\n".join(rows))


def context_texts(
    context: Context, turns: Sequence[Turn] | None, speakers: Iterable[str]
) -> tuple[str, str, str]:
    """(summary, cards, author's note) defused, each empty when absent. Cards are those of the
    members with a turn in `turns` (all of them when None: the upper bound fitting counts).
    The summary and the note keep their lines, quoted where one starts like a participant
    (`defuse_turn`); each card is one `- Name: text` line."""
    who = tuple(speakers)
    summary = context.summary.strip()
    summary = f"{SUMMARY_HEADING}\n{defuse_turn(summary, who, labelled=False)}" if summary else ""
    present = None if turns is None else {t.author for t in turns if t.role == "user"}
    cards = [
        f"- {clean_name(name)}: {text}"
        for member, name, card in context.cards
        if (present is None or member in present) and (text := one_line(card))
    ]
    card_text = neutralize("\n".join([CARDS_HEADING, *cards])) if cards else ""
    note = defuse_turn(context.note.strip(), who, labelled=False) if context.note.strip() else ""
    return summary, card_text, note


def note_index(context: Context, turns: Sequence[Turn]) -> int:
    """Where the author's note goes among `turns`: before the last `note_depth` of them
    (`len(turns)`: after the history and its blocks)."""
    return len(turns) - min(max(context.note_depth, 0), len(turns))


def chat_segments(
    system: str,
    turns: Sequence[Turn],
    *,
    open_response: bool = True,
    post_history: str = "",
    recall: str = "",
    speakers: Iterable[str] = (),
    context: Context = NO_CONTEXT,
) -> list[tuple[str, bool]]:
    """The conversation as (text, is_target) pieces.

    A target piece is an assistant reply body plus its blank line; everything else is prompt.
    Training masks on these pieces; the bot joins them. With `open_response` the text ends with
    the `### Response:` header that asks for the next reply. `post_history` (a persona's
    post_history_instructions) goes in an Input block after the history, as SillyTavern does.
    `recall` (a `render_recall` block) follows the turns (the current message included) and
    precedes `post_history`: the history stays a stable prefix the engine's cache can reuse.
    `context`: the summary (before recall), the members' cards (after it) and the author's
    note (`note_index`), each an Input block.
    `speakers` are the bot's names (its own, the persona's): with every member in `turns` they
    are the participants no member's line may impersonate.
    """
    who = participants(turns, speakers)
    summary, cards, note = context_texts(context, turns, who)
    at = note_index(context, turns) if note else -1
    pieces: list[tuple[str, bool]] = []
    if sys_block := render_system(system):
        pieces.append((sys_block, False))
    for i, turn in enumerate(turns):
        if i == at:
            pieces.append((render_system(note), False))
        if turn.role == "assistant":
            pieces.append((RESPONSE, False))
            pieces.append((neutralize(turn.content.strip()) + SEPARATOR, True))
        else:
            pieces.append((turn.render(who), False))
    after = [render_system(summary), recall, render_system(cards)]
    after.append(render_system(note) if at == len(turns) else "")
    pieces += [(block, False) for block in after if block]
    if post := render_system(post_history):
        pieces.append((post, False))
    if open_response:
        pieces.append((RESPONSE, False))
    return pieces


def render_chat(system: str, turns: Sequence[Turn], **options: Any) -> str:
    """The prompt text: `chat_segments`' pieces joined (the same keyword options)."""
    return "".join(text for text, _ in chat_segments(system, turns, **options))


# --------------------------------------------------------------------------------------------
# Cleaning what the model wrote


#: Most names made stop strings (the first ones given: the members in the prompt). Each stop is
#: scanned for on every streamed piece; `clean_reply` cuts at every known name regardless.
MAX_NAME_STOPS = 24


def stop_strings(other_names: Iterable[str] = ()) -> list[str]:
    """Stops for one request: block headers, and the first `MAX_NAME_STOPS` other participants
    starting a line."""
    names = [n for n in dict.fromkeys(clean_name(n) for n in other_names if n) if n]
    return [*HEADER_STOPS, *(f"\n{n}:" for n in names[:MAX_NAME_STOPS])]


def clean_reply(text: str, other_names: Iterable[str] = (), bot_name: str = "") -> str:
    """Cut a raw completion where the turn ends, and trim it.

    The turn ends at EOS (the engine stops there), at any block header line, or at a line where
    the model starts writing another participant's turn: the same `is_header_line` and
    `starts_as_speaker` rules that defuse members' text, after any line-break form, so the
    result never holds a header line in any disguise. A leading `BotName:` echo is dropped.
    """
    text = text.replace("</s>", "")
    own = speaker_keys([bot_name])
    first = lines(text)[0]
    if own and starts_as_speaker(first, own) and not is_header_line(first):
        # Names are colon-free (`clean_name`): the first colon-like character ends the echo.
        colon = next(i for i, ch in enumerate(text) if _is_colon(ch))
        emphasis = re.match(r"[*_~]*", text[:colon].lstrip()).group()  # as in **Hermes:**
        text = text[colon + 1 :]
        if emphasis and text.startswith(emphasis):
            text = text[len(emphasis) :]
    keys = speaker_keys(other_names)
    pos = 0
    for m in _BREAKS_OR_END.finditer(text):
        line = text[pos : m.start()]
        if is_header_line(line) or starts_as_speaker(line, keys):
            text = text[:pos]
            break
        pos = m.end()
    return drop_fragment(text.strip(), keys)


_BREAKS_OR_END = re.compile(rf"{_BREAKS.pattern}|\Z")
_HEADER_WORDS = ("instruction", "input", "response")
# The end of a reply that is the start of a header a stop cut through: after a line start or a
# space, quote/emphasis marks, a run of `#` and perhaps the first letters of a header word.
_HEADER_TAIL = re.compile(r"(?:^|(?<=\s))[>*_~`\s]*[#\uff03\ufe5f]+[ \t]*(?P<word>\w*)[ \t:]*$")
_MARKS_ONLY = re.compile(r"(?:^|(?<=\n))[>*_~`#\s]+$")


def drop_fragment(text: str, keys: tuple[str, ...] = ()) -> str:
    """`text` without a trailing fragment of a block header or a speaker label.

    A stop string can match inside a longer header (`### Instruction` inside the model's
    `#### Instruction:` leaves `#`), and a reply cut at its length limit can end in half a
    header (`### Instr`) or a dangling `Name` of a participant (`keys`, from `speaker_keys`)
    on its own line. Such a tail is what the stop was about to remove, never part of the
    answer: dropped, repeatedly, and the rest trimmed. A hashtag (`#win`) or `C#` stays.
    """
    while text:
        before = text
        m = _HEADER_TAIL.search(text)
        if not (m and _header_start(m.group("word"), m.group())):
            m = _MARKS_ONLY.search(text)
        if m:
            text = text[: m.start()].rstrip()
        elif keys and len(parts := lines(text)) > 1 and _dangling_name(parts[-1], keys):
            text = text[: len(text) - len(parts[-1])].rstrip()
        if text == before:
            break
    return text


def _header_start(word: str, tail: str) -> bool:
    """Is `word` (after a run of `#`) the beginning of a header word? Empty counts only after a
    line start or a space, a non-empty word needs two `#` as a header does."""
    folded = fold(word)
    if not folded:
        return True
    hashes = sum(tail.count(c) for c in "#\uff03\ufe5f")
    return hashes >= 2 and any(w.startswith(folded) for w in _HEADER_WORDS)


def _dangling_name(line: str, keys: tuple[str, ...]) -> bool:
    """A last line that is a participant's name, or its start, with no colon yet."""
    key = speaker_key(line)
    return bool(key) and not _COLON_CHARS.search(line) and any(k.startswith(key) for k in keys)


# --------------------------------------------------------------------------------------------
# Several speakers on the bot's side (scenes, a channel whose persona changed)


def seen_by(turns: Iterable[Turn], speaker: str) -> list[Turn]:
    """The turns as `speaker` (a persona's name) should see them: only its own replies stay
    Response blocks; a reply another persona (or the plain assistant) wrote becomes a named
    line of that speaker, like a member's message, so no persona is shown another's words as
    its own turns. Replies without a name (older memory) are kept as the speaker's own.

    Names compare by the one speaker rule (`speaker_key` of the name as the prompt shows it).
    Returns new `Turn`s; the order (newest first or oldest first) is kept.
    """
    own = speaker_key(clean_name(speaker))
    out: list[Turn] = []
    for turn in turns:
        name = turn.name.strip()
        if turn.role == "assistant" and name and speaker_key(clean_name(name)) != own:
            turn = replace(turn, role="user")
        out.append(turn)
    return out
