"""Character Card import and export (TavernAI / SillyTavern cards V1, V2 and V3; JSON or PNG).

Cards are uploaded by strangers, so reading them is defensive: the size is checked before anything
else, PNG chunks are walked by hand (the image itself is never decoded), the image's declared size
is bounded, compressed text is inflated with a cap, and every failure is a `CardError` whose message
can be shown to the uploader as it is. Whatever we do not understand (unknown `data` keys, unknown
`extensions`) is carried through untouched, so exporting a card never loses another tool's data.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Largest upload we read at all; checked before parsing.
MAX_CARD_BYTES = 2 * 1024 * 1024
#: Largest inflated text chunk: the base64 of a 2 MB card (4/3 of it) fits, a zip bomb does not.
MAX_TEXT_BYTES = 3 * 1024 * 1024
#: Largest image (width * height) a card may declare; a bigger IHDR is treated as a bomb.
MAX_IMAGE_PIXELS = 4096 * 4096

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
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
    """Character Card V2 JSON, UTF-8; `parse_card` of it gives back an equal Card."""
    indent = 2 if pretty else None
    separators = None if pretty else (",", ":")
    text = json.dumps(card_to_dict(card), ensure_ascii=False, indent=indent, separators=separators)
    return text.encode("utf-8")


# --------------------------------------------------------------------------------------------
# PNG chunks


def _label(filename: str | None) -> str:
    if not filename:
        return "The file"
    name = filename.replace("\n", " ").replace("`", "'").strip()
    return f"'{name[:80]}…'" if len(name) > 80 else f"'{name}'"


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def iter_png_chunks(data: bytes, label: str = "The file") -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of each chunk up to IEND, checking every length against the file's size.

    The CRC is not verified (some card tools write bad ones and SillyTavern reads them anyway),
    but no length is trusted: a chunk that claims to run past the end of the file is an error.
    """
    if not data.startswith(PNG_SIGNATURE):
        raise CardError(f"{label} is not a PNG image.", "format")
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if length > 0x7FFFFFFF or end > len(data):
            raise CardError(
                f"{label} is a damaged PNG file (a chunk runs past the end of the file).",
                "damaged",
            )
        yield ctype, bytes(view[pos + 8 : pos + 8 + length])
        pos = end
        if ctype == b"IEND":
            return


def check_png_header(data: bytes, label: str = "The file") -> tuple[int, int]:
    """Width and height from IHDR, refusing images too large to ever decode safely."""
    first = next(iter_png_chunks(data, label), None)
    if first is None or first[0] != b"IHDR" or len(first[1]) != 13:
        raise CardError(f"{label} is a damaged PNG file (no image header).", "damaged")
    width, height = struct.unpack(">II", first[1][:8])
    if width == 0 or height == 0:
        raise CardError(f"{label} is a damaged PNG file (the image is empty).", "damaged")
    if width * height > MAX_IMAGE_PIXELS:
        raise CardError(
            f"{label} was rejected as a possible decompression bomb: the image claims to be "
            f"{width}x{height} pixels (the limit is {MAX_IMAGE_PIXELS:,} pixels).",
            "bomb",
        )
    return width, height


def _inflate(blob: bytes, label: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(blob, MAX_TEXT_BYTES + 1)
    except zlib.error:
        raise CardError(
            f"{label} is a damaged PNG file (its compressed card text is corrupt).", "damaged"
        ) from None
    if len(out) > MAX_TEXT_BYTES or inflater.unconsumed_tail:
        raise CardError(
            f"{label} was rejected as a possible decompression bomb: its compressed card text "
            f"expands past {MAX_TEXT_BYTES // (1024 * 1024)} MB.",
            "bomb",
        )
    return out


def _text_chunk(ctype: bytes, body: bytes) -> tuple[str, bytes] | None:
    """(lower-case keyword, raw payload still compressed or not) of a text chunk."""
    if ctype not in (b"tEXt", b"zTXt", b"iTXt") or b"\0" not in body:
        return None
    keyword, _, rest = body.partition(b"\0")
    return keyword.decode("latin-1").lower(), rest


def _text_payload(ctype: bytes, rest: bytes, label: str) -> bytes:
    if ctype == b"tEXt":
        return rest
    if ctype == b"zTXt":
        return _inflate(rest[1:], label)  # rest[0]: compression method, always 0 (zlib)
    # iTXt: compression flag, method, language tag \0, translated keyword \0, text
    compressed = rest[:1] == b"\x01"
    _lang, _, after = rest[2:].partition(b"\0")
    _translated, _, text = after.partition(b"\0")
    return _inflate(text, label) if compressed else text


def _png_card_payload(data: bytes, label: str) -> bytes:
    """The winning card chunk's text: `ccv3` over `chara`, wherever they sit in the file."""
    check_png_header(data, label)
    found: dict[str, tuple[bytes, bytes]] = {}
    for ctype, body in iter_png_chunks(data, label):
        if (parsed := _text_chunk(ctype, body)) and parsed[0] in ("ccv3", "chara"):
            found.setdefault(parsed[0], (ctype, parsed[1]))
    winner = found.get("ccv3") or found.get("chara")
    if winner is None:
        raise CardError(
            f"{label} is a plain PNG image: it carries no character card data "
            "(no 'chara' or 'ccv3' text chunk).",
            "no_chunk",
        )
    return _text_payload(winner[0], winner[1], label)


def png_without_card(data: bytes) -> bytes:
    """The same PNG minus its card text chunks: the avatar to store or upload, much smaller."""
    out = [PNG_SIGNATURE]
    for ctype, body in iter_png_chunks(data):
        parsed = _text_chunk(ctype, body)
        if parsed is None or parsed[0] not in ("ccv3", "chara"):
            out.append(_chunk(ctype, body))
    return b"".join(out)


# --------------------------------------------------------------------------------------------
# Parsing uploads

_BASE64_JUNK = re.compile(rb"\s+")


def _load_json(raw: bytes, label: str) -> Any:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CardError(
            f"{label} does not contain valid card JSON (the text is not UTF-8).", "json"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CardError(
            f"{label} does not contain valid card JSON ({e.msg} at line {e.lineno}, "
            f"column {e.colno}).",
            "json",
        ) from None
    except RecursionError:
        raise CardError(
            f"{label} does not contain valid card JSON (nested too deeply).", "json"
        ) from None


def _decode_chunk_text(raw: bytes, label: str) -> Any:
    text = raw.strip()
    if text.startswith(b"{"):  # a few tools store the JSON itself rather than its base64
        return _load_json(text, label)
    text = _BASE64_JUNK.sub(b"", text)
    text += b"=" * (-len(text) % 4)
    try:
        if b"-" in text or b"_" in text:
            decoded = base64.b64decode(text, altchars=b"-_", validate=True)
        else:
            decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if not decoded:
        raise CardError(
            f"{label} has card data that is not valid base64, so it cannot be read.", "base64"
        )
    return _load_json(decoded, label)


def parse_card(data: bytes, filename: str | None = None) -> Card:
    """Read a card upload: V1/V2/V3 JSON, or a PNG carrying one in a `chara`/`ccv3` chunk.

    A PNG card's avatar is the image without its card chunks (bytes); JSON cards have none.
    Raises `CardError` with a message fit for the uploader.
    """
    label = _label(filename)
    if len(data) > MAX_CARD_BYTES:
        raise CardError(
            f"{label} is {len(data) / (1024 * 1024):.1f} MB; character cards can be at most "
            f"{MAX_CARD_BYTES // (1024 * 1024)} MB.",
            "too_big",
        )
    avatar: bytes | None = None
    if data.startswith(PNG_SIGNATURE):
        obj = _decode_chunk_text(_png_card_payload(data, label), label)
        avatar = png_without_card(data)
    elif data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"{", b"["):
        obj = _load_json(data, label)
    else:
        raise CardError(
            f"{label} is not a character card: send a PNG card image or a .json card file.",
            "format",
        )
    card = card_from_dict(obj, label=label)
    card.avatar = avatar
    return card


def export_png(card: Card, image: bytes) -> bytes:
    """`image` (PNG, or anything Pillow reads) with `card` embedded as a `chara` chunk.

    The chunk goes just before IEND, after the image data, as SillyTavern writes it; any
    earlier card chunks (including a `ccv3` that would win on import) are removed.
    """
    if not image.startswith(PNG_SIGNATURE):
        image = _to_png(image)
    check_png_header(image)
    base = png_without_card(image)
    payload = base64.b64encode(export_card(card, pretty=False))
    iend = _chunk(b"IEND", b"")
    body = base[: -len(iend)] if base.endswith(iend) else base
    return body + _chunk(b"tEXt", b"chara\0" + payload) + iend


def _to_png(image: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(image)) as im:
            width, height = im.size  # header only: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise CardError(
                    f"The image was rejected as a possible decompression bomb ({width}x{height}).",
                    "bomb",
                )
            out = io.BytesIO()
            im.save(out, "PNG")
            return out.getvalue()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise CardError(f"The image cannot be read ({e}).", "format") from None
