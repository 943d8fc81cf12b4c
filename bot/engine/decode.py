"""Incremental decoding: generated token ids to streamed text, a few tokens at a time."""

from __future__ import annotations

from typing import Any


class IncrementalDecoder:
    """Turns generated ids into text pieces without re-decoding the whole reply every token.

    Decodes a short window (the previous piece's tokens plus the new ones) and emits what it adds;
    waits while the tail is an incomplete multi-byte character. The window keeps SentencePiece's
    leading-space handling consistent, since both decodes start on the same token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
