"""Card files: reading an upload (JSON or a PNG carrying a card) and writing a PNG card.

Cards are uploaded by strangers, so reading them is defensive: the size is checked before anything
else, PNG chunks are walked by hand (the image itself is never decoded), the image's declared size
is bounded, compressed text is inflated with a cap, and every failure is a `CardError` whose
message can be shown to the uploader as it is. What the JSON inside means is `bot.cards`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from bot.cards import Card, CardError, card_from_dict, export_card

#: Largest upload we read at all; checked before parsing.
MAX_CARD_BYTES = 2 * 1024 * 1024
#: Largest inflated text chunk: the base64 of a 2 MB card (4/3 of it) fits, a zip bomb does not.
MAX_TEXT_BYTES = 3 * 1024 * 1024
#: Largest image (width * height) a card may declare; a bigger IHDR is treated as a bomb.
MAX_IMAGE_PIXELS = 4096 * 4096

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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
