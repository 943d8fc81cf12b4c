"""Who may be named in a place: every name the bot knows there, and labels that tell them apart.

The speaker rule (`bot.prompt.starts_as_speaker`) quotes a line of untrusted text that starts
like a participant's `Name:`. The model reads any such line as that person speaking, whether or
not the person has a turn inside the prompt's window, so the rule is given every name the bot
knows in the server (or DM): the bot's own names and the personas of the channel and its scene
(`reserved`), and for each member their display name, global name and username, from the turns
memory holds and from the Discord layer's member cache (`Conversations`' `members` argument).

Names compare by `bot.textfold.speaker_key` (fold plus UTS #39 skeleton), so `аlice` with a
Cyrillic а is `alice`. Two people whose names share a key are told apart where the prompt labels
them: the bot's side keeps its names, then members in the order of their ids (a Discord id grows
with the account's age, so the older account keeps the plain name); every later one is shown as
`name (2)`, `name (3)` ... (the first number whose key nobody else holds). Nothing here is
stored: the labels are worked out again for each prompt from what is known then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from bot.prompt import Turn, clean_name
from bot.textfold import speaker_key


@dataclass(frozen=True, slots=True)
class Member:
    """One member as the Discord layer knows them: id and names (display, global, username)."""

    id: int
    names: tuple[str, ...]


def _key(name: str) -> str:
    return speaker_key(clean_name(name)) if name else ""


class KnownNames:
    """The names known in one place, and the label each member's name is shown under."""

    def __init__(self, reserved: Iterable[str], members: Mapping[int, Iterable[str]]) -> None:
        self.reserved = [n for n in dict.fromkeys(map(clean_name, reserved)) if n]
        #: key -> who holds it, in rank order (None: the bot's side)
        self._owners: dict[str, list[int | None]] = {}
        for name in self.reserved:
            self._owners.setdefault(_key(name), [None])
        self.members = {m: [n for n in dict.fromkeys(names) if n] for m, names in members.items()}
        for member in sorted(self.members):
            for name in self.members[member]:
                if key := _key(name):
                    holders = self._owners.setdefault(key, [])
                    if member not in holders:
                        holders.append(member)

    def label(self, author: int | None, name: str) -> str:
        """How `name`, said by member `author`, is shown: the name itself unless someone ranked
        before them holds a name with the same key, then `name (n)`. A turn without an author
        (the bot's side: a persona's line, older memory) keeps its name."""
        shown = clean_name(name)
        key = _key(shown)
        if author is None or not key:
            return shown
        holders = self._owners.get(key, [])
        rank = holders.index(author) if author in holders else len(holders)
        if rank == 0:
            return shown
        n = rank + 1
        while any(h != author for h in self._owners.get(_key(f"{shown} ({n})"), [])):
            n += 1
        return f"{shown} ({n})"

    def names(self) -> list[str]:
        """Every name a line of untrusted text may not start with: the bot's side, and each
        member's names as they are shown (labels included)."""
        out = list(self.reserved)
        for member, names in self.members.items():
            out += [self.label(member, n) for n in names]
        return list(dict.fromkeys(out))

    def shown(self, turns: Sequence[Turn]) -> list[Turn]:
        """`turns` with every member's name as its label (new `Turn`s where a label differs)."""
        out = []
        for turn in turns:
            if turn.role == "user" and turn.author is not None:
                label = self.label(turn.author, turn.name)
                if label != clean_name(turn.name):
                    turn = replace(turn, name=label)
            out.append(turn)
        return out
