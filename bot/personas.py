"""Personas: who the bot is in a channel, and the prompt that makes the model play them.

A persona is a Character Card (see `bot.cards`) plus where it came from: a YAML file shipped in
`personas/`, or a card a server imported. The prompt follows SillyTavern's Alpaca roleplay layout
so cards written for SillyTavern behave here as their authors expect: system prompt, character
definitions with triggered lore, example dialogue, the named history, post-history instructions.
All formatting of blocks is left to `bot.prompt`, the single owner of the Alpaca format.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bot.card_files import parse_card
from bot.cards import (
    BookEntry,
    Card,
    CardError,
    CharacterBook,
    card_from_fields,
    normalize_newlines,
)
from bot.prompt import NO_CONTEXT, Context, Turn, clean_name, defuse_turn, other_speakers
from bot.prompt_window import FittedPrompt, TokenCounter, cut_middle, fit_prompt

#: The persona a channel gets when nobody chose one.
DEFAULT_PERSONA = "Hermes"

#: The app default that a card's `system_prompt` replaces (and may quote as `{{original}}`).
DEFAULT_RP_SYSTEM = (
    "You are {{char}} in an ongoing roleplay chat on Discord with {{user}} and others. "
    "Write only {{char}}'s next reply: stay in character, keep the scene moving, put actions "
    "in *asterisks*, and never write lines for anyone else."
)

#: Lore may take at most this share of the window, whatever the book asks for (SillyTavern's
#: default World Info budget is 25% of the context).
LORE_SHARE = 0.25
#: The character definitions may take at most this share of the window; past it they are cut in
#: the middle, so a huge card still leaves room for the conversation.
SYSTEM_SHARE = 0.5

_MACRO = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(bot|user)>", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{\s*original\s*\}\}", re.IGNORECASE)
_START = re.compile(r"<start>", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Personas and where they come from


@dataclass
class Persona:
    """A card plus its source: a shipped YAML file (`path`) or a server import (guild, creator)."""

    card: Card
    path: Path | None = None
    guild_id: int | None = None
    creator_id: int | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def builtin(self) -> bool:
        return self.guild_id is None

    def greetings(self, user_name: str) -> list[str]:
        """first_mes then alternate_greetings, macros applied, blanks left out."""
        texts = [self.card.first_mes, *self.card.alternate_greetings]
        return [g for t in texts if (g := fill(t, self.name, user_name))]


def persona_key(name: str) -> str:
    return " ".join(name.split()).casefold()


class PersonaTable(dict[str, Persona]):
    """Personas by name, looked up case-insensitively (keys are stored case-folded)."""

    def __setitem__(self, name: str, persona: Persona) -> None:
        super().__setitem__(persona_key(name), persona)

    def __getitem__(self, name: str) -> Persona:
        return super().__getitem__(persona_key(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(persona_key(name))

    def __delitem__(self, name: str) -> None:
        super().__delitem__(persona_key(name))

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(persona_key(name), default)

    def add(self, persona: Persona) -> None:
        self[persona.name] = persona


def personas_dir(override: str | Path | None = None) -> Path:
    """The folder of persona YAML files: `override` if given (settings' PERSONAS_DIR), else the
    `personas/` folder beside the `bot` package (an editable checkout), else the copy a regular
    `pip install` puts under `<prefix>/share/hermes-discord/personas`."""
    if override is not None and str(override).strip() not in ("", "."):
        return Path(override).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "personas"
    if checkout.is_dir():
        return checkout
    return Path(sys.prefix) / "share" / "hermes-discord" / "personas"


def load_persona_file(path: Path) -> tuple[Persona, list[str]]:
    """One persona YAML file (Card V2 field names, plus `avatar`), and non-fatal problems.

    Raises CardError for a file that cannot be used; a missing avatar only loses the picture.
    """
    label = f"'{path.name}'"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise CardError(f"{label}: invalid YAML{at} ({getattr(e, 'problem', e)}).") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{label}: cannot be read ({e}).") from None
    if not isinstance(raw, dict):
        raise CardError(f"{label}: should be a mapping of persona fields, not {_kind(raw)}.")
    fields = {str(k): v for k, v in raw.items()}
    avatar = fields.pop("avatar", None)
    card = card_from_fields(fields, label=label, strict=True)
    card.avatar, problem = _resolve_avatar(avatar, path)
    return Persona(card, path=path), [f"{label}: {problem}"] if problem else []


def _kind(value: Any) -> str:
    return "an empty file" if value is None else f"a {type(value).__name__}"


def _resolve_avatar(value: Any, yaml_path: Path) -> tuple[str | None, str | None]:
    """A URL as is, or an image file beside the YAML (never outside the personas folder)."""
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        return None, "avatar should be a URL or an image file name; loaded without an avatar."
    value = value.strip()
    if value.startswith(("https://", "http://")):
        return value, None
    folder = yaml_path.parent.resolve()
    path = (folder / value).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        return None, f"avatar file '{value}' not found beside it; loaded without an avatar."
    return str(path), None


def load_builtin_personas(folder: str | Path | None = None) -> tuple[PersonaTable, list[str]]:
    """Every `*.yaml` persona in `folder` (default: `personas_dir()`), and a list of problems.

    Never raises: a bad file (invalid YAML, not a mapping, no name, wrong types, a duplicate
    name) is reported by file name and skipped, so one typo cannot take the other personas down.
    """
    root = personas_dir(folder)
    table = PersonaTable()
    errors: list[str] = []
    if not root.is_dir():
        return table, [f"Persona folder {root} not found."]
    for path in sorted([*root.glob("*.yaml"), *root.glob("*.yml")]):
        try:
            persona, problems = load_persona_file(path)
        except CardError as e:
            errors.append(str(e))
            continue
        errors += problems
        if (other := table.get(persona.name)) is not None:
            where = other.path.name if other.path else "another file"
            errors.append(f"'{path.name}': the name {persona.name!r} is already used by {where}.")
            continue
        table.add(persona)
    return table, errors


def imported_persona(
    card_json: str | bytes, *, guild_id: int, creator_id: int, avatar: bytes | None = None
) -> Persona:
    """A server's persona from its stored card JSON (memory's `personas.card`) and avatar."""
    data = card_json.encode("utf-8") if isinstance(card_json, str) else card_json
    card = parse_card(data)
    card.avatar = avatar
    return Persona(card, guild_id=guild_id, creator_id=creator_id)


# --------------------------------------------------------------------------------------------
# Macros


def apply_macros(text: str, char: str, user: str) -> str:
    """`{{char}}`/`<BOT>` -> char and `{{user}}`/`<USER>` -> user, any case, in one pass (so a
    name that itself looks like a macro is not expanded again)."""

    def sub(m: re.Match[str]) -> str:
        word = (m.group(1) or m.group(2)).lower()
        return char if word in ("char", "bot") else user

    return _MACRO.sub(sub, text)


def fill(text: str, char: str, user: str) -> str:
    """A card field ready for the prompt: newlines normalised, macros applied, trimmed."""
    return apply_macros(normalize_newlines(text), char, user).strip()


# --------------------------------------------------------------------------------------------
# Lorebook


@functools.lru_cache(maxsize=1024)
def _key_pattern(key: str, case_sensitive: bool) -> re.Pattern[str]:
    # Keys are literal text (escaped, never a regex) matched as whole words.
    return re.compile(rf"(?<!\w){re.escape(key)}(?!\w)", 0 if case_sensitive else re.IGNORECASE)


def _any_key(keys: Iterable[str], text: str, case_sensitive: bool) -> bool:
    return any(k.strip() and _key_pattern(k.strip(), case_sensitive).search(text) for k in keys)


def entry_triggered(entry: BookEntry, text: str) -> bool:
    """Does `text` wake `entry`? A primary key must appear; a selective entry with secondary
    keys also needs one of those (SillyTavern's default AND ANY logic)."""
    if not entry.enabled:
        return False
    if entry.constant:
        return True
    cs = bool(entry.case_sensitive)
    if not _any_key(entry.keys, text, cs):
        return False
    if entry.selective and entry.secondary_keys:
        return _any_key(entry.secondary_keys, text, cs)
    return True


def select_lore(
    book: CharacterBook | None,
    recent_texts: Sequence[str],
    count: Callable[[str], int],
    *,
    scan_depth: int | None = None,
    budget: int | None = None,
) -> list[BookEntry]:
    """The lorebook entries the recent messages call for, in prompt order, within the budget.

    `recent_texts` are newest first; only the newest `scan_depth` are scanned (default: the
    book's `scan_depth`, else all). Disabled entries never fire; `constant` ones fire without a
    key. Ordering follows SillyTavern's World Info: entries are ranked by `insertion_order`,
    highest first, and the budget (`budget`, else the book's `token_budget`, else unlimited) is
    filled in that rank, so the lowest orders are the ones left out when lore runs short; an
    entry that does not fit is skipped and smaller ones after it may still go in. The result is
    in ascending `insertion_order` (ties in book order), so higher orders sit later, closer to
    the conversation, where they weigh more. `priority` is kept on the card but, as in
    SillyTavern, not used.
    """
    if book is None or not book.entries:
        return []
    depth = scan_depth if scan_depth is not None else book.scan_depth
    texts = list(recent_texts) if depth is None else list(recent_texts)[: max(depth, 0)]
    haystack = "\n".join(texts)
    limit = budget if budget is not None else book.token_budget
    woken = [
        (i, e)
        for i, e in enumerate(book.entries)
        if e.content.strip() and entry_triggered(e, haystack)
    ]
    woken.sort(key=lambda p: (-p[1].insertion_order, p[0]))
    chosen: list[tuple[int, BookEntry]] = []
    used = 0
    for i, entry in woken:
        cost = count(entry.content)
        if limit is not None and used + cost > limit:
            continue
        chosen.append((i, entry))
        used += cost
    chosen.sort(key=lambda p: (p[1].insertion_order, p[0]))
    return [e for _, e in chosen]


# --------------------------------------------------------------------------------------------
# The persona prompt


def split_examples(mes_example: str) -> list[str]:
    """The example dialogues of a card, one per `<START>` block, blanks dropped."""
    return [b.strip() for b in _START.split(normalize_newlines(mes_example)) if b.strip()]


def persona_system(
    persona: Persona,
    user_name: str,
    *,
    lore: Sequence[BookEntry] = (),
    examples: int | None = None,
    default_system: str = DEFAULT_RP_SYSTEM,
    count: Callable[[str], int] | None = None,
    cap: int | None = None,
    scene: str = "",
    known: Sequence[str] = (),
) -> str:
    """The persona's whole system text: what goes in the one Input block.

    Order as in SillyTavern's story string: system prompt; lore placed `before_char`;
    description, personality, scenario; lore placed `after_char`; then the first `examples`
    example dialogues (all when None). A card without definitions (the Hermes assistant) is
    just its system line: no roleplay framing is added around empty fields. With `count` and
    `cap`, definitions over `cap` tokens are cut in the middle (the examples are not).
    `user_name` is used as `{{user}}` as the prompt shows names (`clean_name`). `scene` (the
    roster and scenario of a scene the persona plays in, `bot.scenes`) follows the definitions.
    Card text is untrusted: a line of it that starts like one of the `known` names (members,
    other personas) is quoted (`bot.prompt.defuse_turn`) before `{{char}}`/`{{user}}` are
    filled in, so the card's own dialogue lines stay as they are.
    """
    user = clean_name(user_name) or "User"
    others = tuple(other_speakers(known, persona.name))
    head = _join([*_head(persona, user, lore, default_system, others), *([scene] if scene else [])])
    if count is not None and cap is not None and count(head) > cap:
        head = cut_middle(head, count, cap)
    return _join([head], _examples(persona, user, examples, others))


def _head(
    persona: Persona,
    user: str,
    lore: Sequence[BookEntry],
    default_system: str,
    others: tuple[str, ...] = (),
) -> list[str]:
    card, char = persona.card, clean_name(persona.name)
    own = card.system_prompt.strip()
    system = _ORIGINAL.sub(lambda _: default_system.strip(), own) if own else default_system

    def f(text: str) -> str:
        return fill(defuse_turn(text, others, labelled=False), char, user)

    sections = [f(system), "\n".join(f(e.content) for e in lore if e.position != "after_char")]
    sections.append(f(card.description))
    if personality := f(card.personality):
        sections.append(f"{char}'s personality: {personality}")
    if scenario := f(card.scenario):
        sections.append(f"Scenario: {scenario}")
    sections.append("\n".join(f(e.content) for e in lore if e.position == "after_char"))
    return [s for s in sections if s]


def _examples(persona: Persona, user: str, limit: int | None, others: tuple[str, ...] = ()) -> str:
    blocks = split_examples(persona.card.mes_example)[:limit]
    if not blocks:
        return ""
    char = clean_name(persona.name)
    body = "\n".join(
        f"<START>\n{fill(defuse_turn(b, others, labelled=False), char, user)}" for b in blocks
    )
    return f"Example dialogue:\n{body}"


def _join(head: Sequence[str], examples: str = "") -> str:
    return "\n\n".join([*head, examples] if examples else head)


def build_persona_prompt(
    persona: Persona,
    history_newest_first: Sequence[Turn],
    current: Turn | None,
    user_name: str,
    count: TokenCounter,
    budget: int,
    start_hint: int | None = None,
    slack: float = 0.25,
    default_system: str = DEFAULT_RP_SYSTEM,
    scene: str = "",
    known: Sequence[str] = (),
    context: Context = NO_CONTEXT,
) -> FittedPrompt:
    """The whole prompt for `persona`'s next reply, fitted to `budget` tokens by `fit_prompt`.

    Lore is chosen from the current message and the history (its book's scan depth, within
    the book's token budget, never over a quarter of the window). Example dialogues matter less
    than the conversation: when keeping them all would make `fit_prompt` drop history, whole
    examples are removed from the last one back (as many as needed) before any history goes.
    Definitions longer than half the window are cut in the middle as a last resort.

    Assistant turns without a name are the persona's and get its name. `{{user}}` is
    `user_name`, the person being answered. `known` are the names no line of untrusted text
    may start as, besides the persona's own (`bot.speakers.KnownNames.names`). `context`:
    the channel's summary, members' cards and author's note (`bot.prompt.Context`).
    """
    card, char = persona.card, persona.name
    user = clean_name(user_name) or "User"
    history = list(history_newest_first)
    for turn in history:
        if turn.role == "assistant" and not turn.name:
            turn.name = char
    recent = [t.content for t in ([current] if current is not None else []) + history]

    book = card.character_book
    lore_budget = int(budget * LORE_SHARE)
    if book is not None and book.token_budget is not None:
        lore_budget = min(lore_budget, book.token_budget)
    lore = select_lore(book, recent, lambda s: count(fill(s, char, user)), budget=lore_budget)
    others = tuple(other_speakers(known, char))
    post_raw = defuse_turn(
        _ORIGINAL.sub("", card.post_history_instructions), others, labelled=False
    )
    post = fill(post_raw, clean_name(char), user)
    cap = int(budget * SYSTEM_SHARE)

    @functools.cache
    def attempt(n_examples: int) -> FittedPrompt:
        system = persona_system(
            persona,
            user,
            lore=lore,
            examples=n_examples,
            default_system=default_system,
            count=count,
            cap=cap,
            scene=scene,
            known=known,
        )
        return fit_prompt(
            system,
            history,
            current,
            count,
            budget,
            start_hint=start_hint,
            slack=slack,
            post_history=post,
            speakers=[char, *known],
            context=context,
        )

    n = len(split_examples(card.mes_example))
    fitted = attempt(n)
    if n == 0 or not fitted.dropped:
        return fitted
    fitted = attempt(0)
    if fitted.dropped:  # the history overflows even bare: examples stay out
        return fitted
    lo, hi = 0, n - 1  # the most examples that still keep all the history
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = attempt(mid)
        if trial.dropped:
            hi = mid - 1
        else:
            lo, fitted = mid, trial
    return fitted


# --------------------------------------------------------------------------------------------
# Where the bot finds a persona by name


class PersonaLibrary:
    """Built-in personas plus each server's imported ones, looked up by name.

    Imported personas live in SQLite (`PersonaStore.save`); parsed cards are cached per
    (guild, name) and dropped with `invalidate` when a server edits or deletes one.
    """

    def __init__(self, builtins: PersonaTable, memory: Any) -> None:
        self.builtins = builtins
        self.memory = memory
        self._cache: dict[tuple[int, str], Persona] = {}

    async def get(self, name: str | None, guild_id: int | None) -> Persona | None:
        if not name:
            return None
        if guild_id is not None:
            key = (guild_id, persona_key(name))
            if key in self._cache:
                return self._cache[key]
            stored = await self.memory.personas.get(guild_id, name)
            if stored is not None:
                try:
                    persona = imported_persona(
                        stored.card,
                        guild_id=guild_id,
                        creator_id=stored.created_by,
                        avatar=stored.avatar,
                    )
                except CardError:
                    return None  # stored cards were validated on import; a bad one is skipped
                self._cache[key] = persona
                return persona
        return self.builtins.get(name)

    def invalidate(self, guild_id: int, name: str) -> None:
        self._cache.pop((guild_id, persona_key(name)), None)

    async def names(self, guild_id: int | None) -> list[str]:
        """Built-ins first, then the server's own, for listings and autocomplete."""
        names = [p.name for p in self.builtins.values()]
        if guild_id is not None:
            names += [p.name for p in await self.memory.personas.in_guild(guild_id)]
        return names
