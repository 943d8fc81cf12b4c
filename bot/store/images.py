"""Images a member attached to a turn, kept for a vision model (`VISION`).

Why stored, not fetched again: Discord's attachment URLs are signed and expire, and a reply may
be made after a restart (catch-up) or regenerated later; the model must see the same picture
each time the turn is in its window. Only images within `IMAGE_KB` are kept, and they go with
their turn (deleted, cleared) through the foreign key. `sniff` tells the format from the bytes
themselves, so a file named `.png` that is not an image is never sent as one.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from bot.store.db import Store

#: Image formats a vision server takes, by their first bytes.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif"})


def sniff(data: bytes) -> str | None:
    """The image type `data` is (one of IMAGE_TYPES), or None when it is none of them."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True, slots=True)
class Image:
    """One attached image: its type and bytes."""

    mime: str
    data: bytes

    def data_url(self) -> str:
        """`data:image/png;base64,...`: how the OpenAI chat format carries an image inline."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


class ImageStore(Store):
    """A turn's images, in the order they were attached."""

    async def add(self, turn_id: int, images: Iterable[Image]) -> None:
        await self.db.run(
            [
                (
                    "INSERT INTO turn_images (turn_id, idx, mime, data) VALUES (?, ?, ?, ?)",
                    (turn_id, i, image.mime, image.data),
                )
                for i, image in enumerate(images)
            ]
        )

    async def for_turns(self, turn_ids: Iterable[int]) -> dict[int, list[Image]]:
        """The images of each of `turn_ids` that has any."""
        ids = sorted(set(turn_ids))
        out: dict[int, list[Image]] = {}
        for start in range(0, len(ids), 500):  # SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = await self.db.all(
                f"SELECT turn_id, mime, data FROM turn_images WHERE turn_id IN "
                f"({', '.join('?' * len(chunk))}) ORDER BY turn_id, idx",
                chunk,
            )
            for turn_id, mime, data in rows:
                out.setdefault(turn_id, []).append(Image(mime, bytes(data)))
        return out
