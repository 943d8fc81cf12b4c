"""Comparison forms of untrusted text: one line-break form, one fold, one speaker key.

`bot.prompt` decides what to defuse; this module only says what two strings *read as*, so the
header rule, the speaker rule and the names that tell members apart all compare the same way:

- `normalize_text`: every Unicode line break becomes "\\n"; format characters (category Cf:
  zero-width, bidi controls, tag characters), other control characters and lone surrogates are
  dropped. A zero-width (non-)joiner is kept only between two non-ASCII characters (emoji
  sequences, Indic scripts), where it cannot hide anything the folded comparison would miss.
- `fold`: NFKD, marks and Cf dropped, NFKC, case-folded, invisible fillers as spaces.
- `skeleton`: Unicode's UTS #39 confusable skeleton of folded text (Cyrillic `а`, Greek `ο`,
  `1` for `l` ... mapped to their prototype), from the `disarm` package's copy of Unicode's
  `confusables.txt` (its `CONFUSABLES_VERSION`), never a table of our own.
- `speaker_key`: the skeleton of the fold with colon look-alikes as `:` and no spaces or
  Markdown emphasis: the form in which a line's `Name:` label and a participant's name compare.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import disarm
import regex

# Every line break Python's str.splitlines knows (CR, LF, CRLF, VT, FF, FS, GS, RS, NEL, LS, PS).
BREAKS = re.compile(r"\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_JOINERS = "\u200c\u200d"
_DROP = regex.compile(
    rf"(?![{_JOINERS}])\p{{Cf}}|\p{{Cs}}|[\x00-\x08\x0e-\x1f\x7f-\x9f]"
    rf"|(?<![^\x00-\x7f\s])[{_JOINERS}]|[{_JOINERS}](?![^\x00-\x7f\s])"
)
_ASCII_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
# Characters that render blank without being whitespace (Hangul fillers, braille blank).
_BLANKS = str.maketrans(dict.fromkeys("\u115f\u1160\u3164\uffa0\u2800", " "))
_MARKS_AND_FORMAT = regex.compile(r"[\p{M}\p{Cf}\p{Cc}\p{Cs}--[\n\t]]", regex.V1)
# Colon look-alikes that NFKC leaves alone (ratio, modifier letter colons, Armenian/Hebrew ...).
COLONS = "\u2236\ua789\u02f8\u0589\u05c3\u0703\u0704\u1804\ufe30\uff1a\ufe55\ufe13"
_SPEAKER_NOISE = regex.compile(r"[\s*_~`|]+")
_COLON_MAP = str.maketrans(dict.fromkeys(COLONS, ":"))
# Quick rejection: the only characters whose fold holds a `:` (checked over all of Unicode),
# plus the colon look-alikes above. A line without one is no speaker line.
COLON_CHARS = re.compile(f"[:\u2a74{COLONS}]")


def normalize_text(text: str) -> str:
    """Untrusted text with one line-break form ("\\n") and no invisible or control characters."""
    text = BREAKS.sub("\n", text)
    return _ASCII_CONTROLS.sub("", text) if text.isascii() else _DROP.sub("", text)


def lines(text: str) -> list[str]:
    """`text` split at every Unicode line break (the same breaks `normalize_text` unifies)."""
    return BREAKS.split(text)


def fold(text: str) -> str:
    """The comparison form of `text`: NFKD, combining marks and format/control characters
    dropped, NFKC, case-folded, blank fillers as spaces. Full-width `＃`, `Ｒｅｓｐｏｎｓｅ`,
    `Re\u0301sponse` and `Res\u200bponse` all fold to plain lower-case ASCII."""
    text = _MARKS_AND_FORMAT.sub("", unicodedata.normalize("NFKD", text))
    return unicodedata.normalize("NFKC", text).translate(_BLANKS).casefold()


def fold_colons(text: str) -> str:
    """`text` with every colon look-alike (full-width, ratio, modifier colon ...) as `:`."""
    return text.translate(_COLON_MAP)


def skeleton(text: str) -> str:
    """The UTS #39 skeleton of `text` after `fold`: two strings are confusable when their
    skeletons are equal (`аlice` with a Cyrillic а, `ALICE`, `a1ice` and `alice` share one).

    Folded first because the confusables table maps lower-case forms: folding case after the
    skeleton would keep `I` and `l` apart in one string and merge them in another.
    """
    return disarm.skeleton_key(fold(text), digit_policy="tr39") if text else ""


@functools.lru_cache(maxsize=8192)
def speaker_key(text: str) -> str:
    """The form the speaker rule compares: the `skeleton` of the fold, colon look-alikes as
    `:`, no spaces or Markdown emphasis (so `**HERMES :**`, `Ｈｅｒｍｅｓ：`, `h e r m e s:` and
    `Неrmes:` with a Cyrillic Н and е all match Hermes)."""
    plain = _SPEAKER_NOISE.sub("", fold_colons(fold(text)))
    return _SPEAKER_NOISE.sub("", fold_colons(skeleton(plain))) if plain else ""
