"""Character Cards (TavernAI / SillyTavern V1, V2 and V3): the card, and its JSON shape both ways.

A card's fields are read from whichever shape a tool wrote (a V2/V3 `data` envelope, V1 flat, the
pre-V1 key names), leniently for imports and strictly for our own YAML persona files, and every
failure is a `CardError` whose message can be shown to the uploader as it is. Whatever we do not
understand (unknown `data` keys, unknown `extensions`) is carried through untouched, so exporting
a card never loses another tool's data. Reading an uploaded file (its size, PNG chunks, base64)
and writing a PNG card are `bot.card_files`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SPEC_V2 = "chara_card_v2"
SPEC_V3 = "chara_card_v3"
POSITIONS = ("before_char", "after_char")

#: The text fields of Character Card V2 `data`, in the spec's order.
TEXT_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
)
LIST_FIELDS = ("alternate_greetings", "tags")
META_FIELDS = ("creator", "character_version")
CARD_FIELDS = (*TEXT_FIELDS, *LIST_FIELDS, *META_FIELDS, "character_book", "extensions")

#: Pre-V1 (Pygmalion/Gradio) key names still found in the wild, mapped as SillyTavern maps them.
OLD_KEYS = {
    "char_name": "name",
    "char_persona": "description",
    "world_scenario": "scenario",
    "char_greeting": "first_mes",
    "example_dialogue": "mes_example",
}


class CardError(ValueError):
    """A card that cannot be used; `str(err)` is a sentence for the uploader.

    `kind` names the failure class ("too_big", "format", "damaged", "no_chunk", "base64", "json",
    "bomb", "no_name", "field") so callers and tests can tell them apart without parsing text.
    """

    def __init__(self, message: str, kind: str = "field") -> None:
        super().__init__(message)
        self.kind = kind


# --------------------------------------------------------------------------------------------
# The card


@dataclass
class BookEntry:
    """One lorebook entry; optional spec fields stay None when absent so export omits them."""

    keys: list[str] = field(default_factory=list)
    content: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool | None = None
    name: str | None = None
    priority: int | None = None
    id: int | str | None = None
    comment: str | None = None
    selective: bool | None = None
    secondary_keys: list[str] | None = None
    constant: bool | None = None
    position: str | None = None  # "before_char" | "after_char"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CharacterBook:
    """A card's embedded lorebook (`character_book`)."""

    entries: list[BookEntry] = field(default_factory=list)
    name: str | None = None
    description: str | None = None
    scan_depth: int | None = None
    token_budget: int | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Card:
    """Character Card V2 `data`, plus the avatar that travelled with it.

    `extra` holds unknown `data` keys (V3 additions, other tools' fields) so they survive a round
    trip. `avatar` (a URL, a file path, or PNG bytes) is not part of the card JSON and is left out
    of equality: a card exported as JSON and read back is the same card without its picture.
    """

    name: str
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = field(default_factory=list)
    character_book: CharacterBook | None = None
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    avatar: str | bytes | None = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# From and to plain dicts


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


class _Reader:
    """Reads card fields leniently (imports: real cards hold nulls and numbers where text belongs)
    or strictly (our own YAML files, where a wrong type is a mistake worth reporting)."""

    def __init__(self, label: str, strict: bool) -> None:
        self.label = label
        self.strict = strict

    def fail(self, where: str, expected: str) -> CardError:
        return CardError(f"{self.label}: field '{where}' should be {expected}.", "field")

    def text(self, value: Any, where: str) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return normalize_newlines(value)
        if not self.strict and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise self.fail(where, "text")

    def opt_text(self, value: Any, where: str) -> str | None:
        return None if value is None else self.text(value, where)

    def texts(self, value: Any, where: str) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str) and not self.strict:
            return [normalize_newlines(value)] if value.strip() else []
        if not isinstance(value, list):
            raise self.fail(where, "a list of text")
        out = []
        for item in value:
            if item is None and not self.strict:
                continue
            out.append(self.text(item, where))
        return out

    def integer(self, value: Any, where: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not self.strict:
            try:
                return int(float(value))
            except (TypeError, ValueError, OverflowError):
                return None
        raise self.fail(where, "a whole number")

    def flag(self, value: Any, where: str) -> bool | None:
        if value is None or isinstance(value, bool):
            return value
        if not self.strict and isinstance(value, int | str):
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        raise self.fail(where, "true or false")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(value)
        if self.strict:
            raise self.fail(where, "a mapping")
        return {}

    def unknown(self, extra: dict[str, Any], where: str) -> None:
        if self.strict and extra:
            names = ", ".join(sorted(map(str, extra)))
            raise CardError(f"{self.label}: unknown field(s) in {where}: {names}.", "field")


_ENTRY_FIELDS = (
    "keys",
    "content",
    "extensions",
    "enabled",
    "insertion_order",
    "case_sensitive",
    "name",
    "priority",
    "id",
    "comment",
    "selective",
    "secondary_keys",
    "constant",
    "position",
)
_BOOK_FIELDS = (
    "name",
    "description",
    "scan_depth",
    "token_budget",
    "recursive_scanning",
    "extensions",
    "entries",
)


def _entry_from_dict(raw: Any, where: str, r: _Reader) -> BookEntry | None:
    if not isinstance(raw, dict):
        if r.strict:
            raise r.fail(where, "a mapping")
        return None
    extra = {k: v for k, v in raw.items() if k not in _ENTRY_FIELDS}
    r.unknown(extra, where)
    entry_id = raw.get("id")
    if not isinstance(entry_id, int | str) or isinstance(entry_id, bool):
        entry_id = r.integer(entry_id, f"{where}.id")
    position = r.opt_text(raw.get("position"), f"{where}.position")
    if r.strict and position is not None and position not in POSITIONS:
        raise r.fail(f"{where}.position", "before_char or after_char")
    secondary = raw.get("secondary_keys")
    enabled = r.flag(raw.get("enabled"), f"{where}.enabled")
    return BookEntry(
        keys=r.texts(raw.get("keys"), f"{where}.keys"),
        content=r.text(raw.get("content"), f"{where}.content"),
        extensions=r.mapping(raw.get("extensions"), f"{where}.extensions"),
        enabled=True if enabled is None else enabled,
        insertion_order=r.integer(raw.get("insertion_order"), f"{where}.insertion_order") or 0,
        case_sensitive=r.flag(raw.get("case_sensitive"), f"{where}.case_sensitive"),
        name=r.opt_text(raw.get("name"), f"{where}.name"),
        priority=r.integer(raw.get("priority"), f"{where}.priority"),
        id=entry_id,
        comment=r.opt_text(raw.get("comment"), f"{where}.comment"),
        selective=r.flag(raw.get("selective"), f"{where}.selective"),
        secondary_keys=None if secondary is None else r.texts(secondary, f"{where}.secondary_keys"),
        constant=r.flag(raw.get("constant"), f"{where}.constant"),
        position=position,
        extra=extra,
    )


def _book_from_dict(raw: Any, r: _Reader) -> CharacterBook | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        if r.strict:
            raise r.fail("character_book", "a mapping")
        return None
    extra = {k: v for k, v in raw.items() if k not in _BOOK_FIELDS}
    r.unknown(extra, "character_book")
    raw_entries = raw.get("entries")
    if raw_entries is None:
        raw_entries = []
    if not isinstance(raw_entries, list):
        # SillyTavern world files key entries by uid; accept that shape on import.
        if isinstance(raw_entries, dict) and not r.strict:
            raw_entries = list(raw_entries.values())
        else:
            raise r.fail("character_book.entries", "a list")
    entries = [
        e
        for i, item in enumerate(raw_entries)
        if (e := _entry_from_dict(item, f"character_book.entries[{i}]", r)) is not None
    ]
    return CharacterBook(
        entries=entries,
        name=r.opt_text(raw.get("name"), "character_book.name"),
        description=r.opt_text(raw.get("description"), "character_book.description"),
        scan_depth=r.integer(raw.get("scan_depth"), "character_book.scan_depth"),
        token_budget=r.integer(raw.get("token_budget"), "character_book.token_budget"),
        recursive_scanning=r.flag(raw.get("recursive_scanning"), "character_book.recursive"),
        extensions=r.mapping(raw.get("extensions"), "character_book.extensions"),
        extra=extra,
    )


def card_from_fields(
    fields: Mapping[str, Any], *, label: str = "The card", strict: bool = False
) -> Card:
    """A Card from V2 `data`-shaped fields. Strict mode (our YAML) rejects wrong types and
    unknown keys; lenient mode (imports) coerces what it can and keeps unknown keys in `extra`."""
    r = _Reader(label, strict)
    extra = {k: v for k, v in fields.items() if k not in CARD_FIELDS}
    r.unknown(extra, "the card")
    texts = {k: r.text(fields.get(k), k) for k in TEXT_FIELDS}
    name = " ".join(texts.pop("name").split())  # one line: names end up in "Name:" prefixes
    if not name:
        raise CardError(
            f"{label} has no character name: its 'name' field is missing or blank.", "no_name"
        )
    return Card(
        name=name,
        **texts,
        alternate_greetings=r.texts(fields.get("alternate_greetings"), "alternate_greetings"),
        character_book=_book_from_dict(fields.get("character_book"), r),
        tags=_tags(fields.get("tags"), r),
        creator=r.text(fields.get("creator"), "creator"),
        character_version=r.text(fields.get("character_version"), "character_version"),
        extensions=r.mapping(fields.get("extensions"), "extensions"),
        extra=copy.deepcopy(extra),
    )


def _tags(value: Any, r: _Reader) -> list[str]:
    if isinstance(value, str) and not r.strict:  # "fantasy, dwarf" from older exporters
        return [t.strip() for t in value.split(",") if t.strip()]
    return r.texts(value, "tags")


def card_from_dict(obj: Any, *, label: str = "The card") -> Card:
    """A Card from any card JSON object: V2/V3 envelope, or V1 flat with old key names."""
    if not isinstance(obj, dict):
        raise CardError(f"{label} does not contain valid card JSON (not a JSON object).", "json")
    data = obj.get("data")
    spec = str(obj.get("spec", ""))
    if isinstance(data, dict) and (spec in (SPEC_V2, SPEC_V3) or "name" in data):
        return card_from_fields(data, label=label)
    fields = {
        k: v for k, v in obj.items() if k not in OLD_KEYS and k not in ("spec", "spec_version")
    }
    for old, new in OLD_KEYS.items():
        if old in obj and not fields.get(new):
            fields[new] = obj[old]
    return card_from_fields(fields, label=label)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _entry_to_dict(e: BookEntry) -> dict[str, Any]:
    out = {
        "keys": list(e.keys),
        "content": e.content,
        "extensions": copy.deepcopy(e.extensions),
        "enabled": e.enabled,
        "insertion_order": e.insertion_order,
    }
    out |= _drop_none(
        {
            "case_sensitive": e.case_sensitive,
            "name": e.name,
            "priority": e.priority,
            "id": e.id,
            "comment": e.comment,
            "selective": e.selective,
            "secondary_keys": None if e.secondary_keys is None else list(e.secondary_keys),
            "constant": e.constant,
            "position": e.position,
        }
    )
    for k, v in e.extra.items():
        out.setdefault(k, copy.deepcopy(v))
    return out


def _book_to_dict(b: CharacterBook) -> dict[str, Any]:
    out = _drop_none(
        {
            "name": b.name,
            "description": b.description,
            "scan_depth": b.scan_depth,
            "token_budget": b.token_budget,
            "recursive_scanning": b.recursive_scanning,
        }
    )
    out["extensions"] = copy.deepcopy(b.extensions)
    out["entries"] = [_entry_to_dict(e) for e in b.entries]
    for k, v in b.extra.items():
        out.setdefault(k, copy.deepcopy(v))
    return out


def card_to_dict(card: Card) -> dict[str, Any]:
    """The Character Card V2 object for `card` (unknown keys last, never shadowing known ones)."""
    data: dict[str, Any] = {k: getattr(card, k) for k in TEXT_FIELDS}
    data["alternate_greetings"] = list(card.alternate_greetings)
    if card.character_book is not None:
        data["character_book"] = _book_to_dict(card.character_book)
    data["tags"] = list(card.tags)
    data["creator"] = card.creator
    data["character_version"] = card.character_version
    data["extensions"] = copy.deepcopy(card.extensions)
    for k, v in card.extra.items():
        data.setdefault(k, copy.deepcopy(v))
    return {"spec": SPEC_V2, "spec_version": "2.0", "data": data}


def export_card(card: Card, *, pretty: bool = True) -> bytes:
    """Character Card V2 JSON, UTF-8; `bot.card_files.parse_card` of it gives back an equal Card."""
    indent = 2 if pretty else None
    separators = None if pretty else (",", ":")
    text = json.dumps(card_to_dict(card), ensure_ascii=False, indent=indent, separators=separators)
    return text.encode("utf-8")
