"""The records `prepare` reads, normalises and writes: one training example, one source's tally.

Apart from `training.sources` (which reads sources) and `training.data` (which mixes them) so
that a source reader living in its own module (`training.memory_source`) can build records
without importing the reader that dispatches to it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("training.data")

#: How many problem positions the report lists per source (all are counted).
MAX_LISTED_PROBLEMS = 20

#: Roles of a chat message: "input" is a tool call or tool result, shown in an Input block.
ROLES = ("user", "assistant", "input")


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "user" | "assistant" | "input"
    content: str
    name: str = ""  # the speaker's name on a user turn (`alice: ...`), the tool on an input


@dataclass(slots=True)
class Record:
    """One training example. Single-turn records fill instruction/input/output; multi-turn ones
    fill `conversation` (alternating user/assistant, ending with an assistant turn)."""

    source: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    conversation: list[Message] | None = None
    system: str = ""
    #: The exact (text, is_target) pieces the bot's prompt builders made (persona chats, the
    #: bot's memory); None: the pieces are rendered from the fields above.
    segments: list[tuple[str, bool]] | None = None
    position: str = ""  # where it was read, for reports; not written out
    skipped_turns: Counter[str] = field(default_factory=Counter)  # speaker -> turns left out

    @property
    def is_chat(self) -> bool:
        return self.conversation is not None

    def targets(self) -> list[str]:
        """The texts the model is trained to write."""
        if self.segments is not None:
            return [text.strip() for text, target in self.segments if target]
        if self.conversation is None:
            return [self.output]
        return [m.content for m in self.conversation if m.role == "assistant"]

    def texts(self) -> list[str]:
        if self.segments is not None:
            return [text for text, _ in self.segments]
        if self.conversation is None:
            return [self.instruction, self.input, self.output]
        return [self.system] + [f"{m.role}:{m.content}" for m in self.conversation]

    def to_json(self) -> dict[str, Any]:
        if self.conversation is None:
            return {
                "source": self.source,
                "instruction": self.instruction,
                "input": self.input,
                "output": self.output,
            }
        out = {
            "source": self.source,
            "system": self.system,
            "conversation": [
                {k: v for k, v in asdict(m).items() if k != "name" or v} for m in self.conversation
            ],
        }
        if self.segments is not None:
            out["segments"] = [[text, target] for text, target in self.segments]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        if "conversation" in data:
            turns = [
                Message(m["role"], m["content"], m.get("name", "")) for m in data["conversation"]
            ]
            segments = data.get("segments")
            return cls(
                data["source"],
                conversation=turns,
                system=data.get("system", ""),
                segments=None if segments is None else [(t, bool(g)) for t, g in segments],
            )
        return cls(data["source"], data["instruction"], data.get("input", ""), data["output"])


@dataclass
class SourceStats:
    """What happened to one source's records."""

    name: str
    format: str = ""
    records_in: int = 0  # normalised records plus malformed raw records
    dropped: Counter[str] = field(default_factory=Counter)
    truncated: int = 0  # kept, with trailing turns cut to fit
    mix_delta: int = 0  # records removed (<0) or repeated (>0) by weight/limit
    records_out: int = 0
    problems: list[str] = field(default_factory=list)  # "position: reason", first few
    errors: list[str] = field(default_factory=list)  # whole file/source unreadable or empty
    optional: bool = False  # errors skip the source instead of failing `prepare`
    skipped_turns: Counter[str] = field(default_factory=Counter)  # unknown speaker -> turns
    forgotten: int = 0  # hermes-memory: turns forgotten or hidden from the bot, left out

    def problem(self, position: str, reason: str) -> None:
        """A malformed record: counted, listed (the first few) and skipped."""
        self.records_in += 1
        self.dropped["malformed"] += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(f"{position}: {reason}")
        log.warning("%s %s: %s (record skipped)", self.name, position, reason)

    def error(self, position: str, reason: str) -> None:
        """A source that cannot be read at all (or holds nothing): reported by name; unless the
        source is optional, `write_prepared` then refuses to write."""
        self.errors.append(f"{position}: {reason}")
        if self.optional:
            log.warning("%s %s: %s (optional source skipped)", self.name, position, reason)
        else:
            log.error("%s %s: %s", self.name, position, reason)


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What rendering through the bot's prompt builders needs: the tokenizer's count (the
    bot's `count_tokens`), the whole-record measure, the length limit and the mix seed."""

    count: Callable[[str], int] | None = None
    measure: Callable[[Record], tuple[int, int]] | None = None
    max_length: int = 4096
    seed: int = 42
    #: the prompt format the bot picks for this tokenizer (`bot.prompt_template.choose_format`);
    #: None is Alpaca
    fmt: Any = None


#: A record's (prompt tokens, target tokens).
Measure = Callable[[Record], tuple[int, int]]
