"""What a Discord message says, attachments included: the text a turn is stored with.

Discord turns a long paste into a `message.txt` attachment, and people share code as `.py` or
`.txt` files, so a bot that stores only `[attached: message.txt]` answers without seeing the
question. Text attachments (a text content type, or a known text/code extension) are read, up
to `ATTACHMENT_KB` per message, decoded as UTF-8 (bad bytes replaced), and stored as part of the
turn under their name in a code fence; larger or binary ones stay `[attached: NAME]`. A failed
download is noted in the turn, never fatal.

The stored text is the original; `bot.prompt` defuses it when it goes into a prompt, like any
message text, and the fitting counts it like any message text. New messages, edits and the
messages read back after a restart all go through `message_text`, so an edit keeps its
attachments.

With `VISION` on, images (PNG, JPEG, WebP, GIF within `IMAGE_KB`) are also read as bytes
(`message_images`) and kept with the turn for a vision model (`bot.store.images`).

Part of the Discord layer: it reads discord.py's `Message` and `Attachment`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import PurePosixPath

import discord

from bot.discord.posting import humanize
from bot.store.images import IMAGE_TYPES, Image, sniff

log = logging.getLogger(__name__)

#: Content types read as text besides `text/*`.
TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/x-javascript",
        "application/x-yaml",
        "application/yaml",
        "application/toml",
        "application/x-sh",
        "application/sql",
        "application/x-python",
        "application/x-httpd-php",
        "application/ld+json",
        "application/csv",
    }
)
#: Extensions read as text whatever content type Discord guessed (it often says octet-stream).
_TEXT_EXTENSIONS = """txt md markdown rst log csv tsv json jsonl yaml yml toml ini cfg conf env xml html htm css
    py pyi ipynb js mjs cjs ts tsx jsx java kt kts scala go rs c h cc cpp cxx hpp hh cs fs swift m
    mm rb php pl pm lua r jl sh bash zsh fish ps1 bat cmd sql graphql proto tex bib diff patch
    dockerfile makefile cmake gradle properties vue svelte dart ex exs erl hs ml clj lisp scm el
    nim zig v sol asm s"""
TEXT_EXTENSIONS = frozenset(_TEXT_EXTENSIONS.split())
#: Seconds a download may take before it is given up (and noted).
DOWNLOAD_TIMEOUT = 10.0


def is_text(attachment: discord.Attachment) -> bool:
    """Whether `attachment` looks like text: by its content type, else by its extension."""
    kind = (attachment.content_type or "").split(";")[0].strip().lower()
    if kind.startswith("text/") or kind in TEXT_TYPES:
        return True
    path = PurePosixPath(attachment.filename.lower())
    return path.suffix.lstrip(".") in TEXT_EXTENSIONS or path.name in TEXT_EXTENSIONS


def fenced(name: str, text: str) -> str:
    """`text` under its file name in a code fence longer than any backtick run inside it."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    lang = PurePosixPath(name).suffix.lstrip(".")
    return f"[attached: {name}]\n{fence}{lang}\n{text.rstrip(chr(10))}\n{fence}"


async def _read(attachment: discord.Attachment) -> bytes:
    return await asyncio.wait_for(attachment.read(), DOWNLOAD_TIMEOUT)


async def attachment_lines(attachments: Sequence[discord.Attachment], limit_kb: int) -> list[str]:
    """One entry per attachment: the file's text, fenced, or an `[attached: NAME ...]` note."""
    budget = max(0, limit_kb) * 1024
    out: list[str] = []
    for attachment in attachments:
        name = attachment.filename
        if not is_text(attachment):
            out.append(f"[attached: {name}]")
            continue
        if attachment.size > budget:
            out.append(f"[attached: {name} ({attachment.size // 1024 + 1} KB, too large to read)]")
            continue
        try:
            data = await _read(attachment)
        except (discord.HTTPException, OSError, TimeoutError) as exc:
            log.warning("could not download attachment %s: %s", name, exc)
            out.append(f"[attached: {name} (could not be downloaded)]")
            continue
        if b"\x00" in data[:8192]:  # a binary file under a text name
            out.append(f"[attached: {name}]")
            continue
        budget -= len(data)
        out.append(fenced(name, data.decode("utf-8", errors="replace")))
    return out


def looks_like_image(attachment: discord.Attachment) -> bool:
    """An attachment that says it is a PNG, JPEG, WebP or GIF image (its bytes decide later)."""
    kind = (attachment.content_type or "").split(";")[0].strip().lower()
    suffix = PurePosixPath(attachment.filename.lower()).suffix
    return kind in IMAGE_TYPES or suffix in (".png", ".jpg", ".jpeg", ".webp", ".gif")


async def message_images(
    attachments: Sequence[discord.Attachment], limit_kb: int
) -> list[Image]:
    """VISION: the message's images within `limit_kb` each, for the model to see. A file that
    is too large, fails to download or is not really an image (`sniff`) is left out; the turn's
    text names every attachment either way."""
    out: list[Image] = []
    for attachment in attachments:
        if not looks_like_image(attachment) or attachment.size > limit_kb * 1024:
            continue
        try:
            data = await _read(attachment)
        except (discord.HTTPException, OSError, TimeoutError) as exc:
            log.warning("could not download image %s: %s", attachment.filename, exc)
            continue
        mime = sniff(data)
        if mime is not None and len(data) <= limit_kb * 1024:
            out.append(Image(mime, data))
    return out


async def message_text(
    message: discord.Message, bot_user: discord.abc.User | None, limit_kb: int
) -> str:
    """The text a turn stores for `message`: its content, then its attachments."""
    text = humanize(message, bot_user)
    if message.attachments:
        lines = await attachment_lines(message.attachments, limit_kb)
        text = "\n".join([text, *lines]).strip()
    return text
