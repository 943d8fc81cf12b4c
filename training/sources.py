"""Reading sources: files and datasets record by record, each in its format, as the bot serves it.

A source is a JSON or JSONL file or a Hugging Face dataset (`training.config.SourceConfig`); each
raw record is normalised by its format (`training.source_formats`, or read whole by
`training.memory_source` for the bot's own memory). Chats are trained on the text the bot
serves: user turns carry a speaker name (`alice: ...`), which a source can set (`names:`, fixed
or drawn per conversation), and a source with a `persona:` card is rendered reply by reply with
the bot's prompt builders (`training.served`): such a record carries its exact text pieces
(`segments`). A broken record is reported with its source and position and skipped; a source
that cannot be read, or holds no record at all, is an error that names it.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import SourceConfig
from training.records import LoadContext, Message, Record, SourceStats
from training.source_formats import FORMATS, MEMORY_FORMAT, BadRecord, detect_format


def iter_raw(src: SourceConfig, stats: SourceStats) -> Iterator[tuple[str, Any]]:
    """(position, raw record) of one source; unreadable files and lines become problems."""
    if src.hf is not None:
        try:
            import datasets
        except ImportError:
            stats.error(
                "source", "`datasets` is not installed: pip install 'hermes-discord[train]'"
            )
            return
        try:
            rows = datasets.load_dataset(src.hf, src.hf_config, split=src.split)
        except Exception as exc:  # network, auth, unknown name: report and go on with the rest
            stats.error("source", f"cannot load dataset {src.hf!r}: {exc}")
            return
        for i, row in enumerate(rows):
            yield f"row {i}", row
        return
    path = Path(str(src.path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        stats.error(str(path), f"cannot read: {exc.strerror or exc}")
        return
    except UnicodeDecodeError as exc:
        stats.error(str(path), f"cannot read: not UTF-8 text ({exc.reason})")
        return
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name} line {n}", json.loads(line)
            except json.JSONDecodeError as exc:
                stats.problem(f"{path.name} line {n}", f"invalid JSON ({exc.msg})")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        stats.error(f"{path.name} line {exc.lineno}", f"invalid JSON file ({exc.msg})")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        stats.error(path.name, "expected a JSON list of records")
        return
    for i, raw in enumerate(data):
        yield f"{path.name} record {i}", raw


def source_label(src: SourceConfig) -> str:
    return str(src.path) if src.path is not None else f"dataset {src.hf}"


def load_source(
    src: SourceConfig, stats: SourceStats, ctx: LoadContext | None = None
) -> Iterator[Record]:
    """Normalised records of one source, with malformed ones reported and skipped.

    With `format: auto` each record's format is read from its keys, so a file that mixes
    Alpaca and ShareGPT records works; a named format is enforced on every record. A source
    that yields nothing at all is an error naming it.
    """
    ctx = ctx or LoadContext()
    stats.optional = src.optional
    if src.format == MEMORY_FORMAT:
        from training.memory_source import load_memory

        yield from load_memory(src, stats, ctx)
    elif src.format != "auto" and src.format not in FORMATS:
        known = sorted([*FORMATS, MEMORY_FORMAT])
        stats.error("source", f"unknown format {src.format!r}; known: {known}")
    else:
        yield from _load_records(src, stats, ctx)
    if stats.records_in == 0 and not stats.errors:
        stats.error(source_label(src), "no records: the source is empty")


def _load_records(src: SourceConfig, stats: SourceStats, ctx: LoadContext) -> Iterator[Record]:
    style = ChatStyle.for_source(src, stats, ctx)
    if style is None:
        return
    seen: list[str] = []
    for position, raw in iter_raw(src, stats):
        if not isinstance(raw, dict):
            stats.problem(position, f"record is {type(raw).__name__}, not an object")
            continue
        try:
            fmt = detect_format(raw) if src.format == "auto" else src.format
            records = FORMATS[fmt](raw, src.name)
        except BadRecord as exc:
            stats.problem(position, str(exc))
            continue
        if fmt not in seen:
            seen.append(fmt)
            stats.format = "+".join(seen)
        for j, rec in enumerate(records):
            rec.position = position if len(records) == 1 else f"{position} instance {j}"
            stats.skipped_turns.update(rec.skipped_turns)
            for served in style.apply(rec):
                stats.records_in += 1
                yield served


def pick_name(names: list[str], seed: int, source: str, position: str) -> str:
    """One of `names` for a conversation, the same every run (seeded by source and position)."""
    if not names:
        return ""
    return random.Random(f"{seed}\x1f{source}\x1f{position}").choice(names)


@dataclass
class ChatStyle:
    """How one source's chats are served: its system text, speaker names and persona card."""

    source: SourceConfig
    seed: int
    persona: Any = None  # bot.personas.Persona
    server: Any = None  # training.served.Server for the persona

    @classmethod
    def for_source(
        cls, src: SourceConfig, stats: SourceStats, ctx: LoadContext
    ) -> ChatStyle | None:
        """The style, or None (an error reported) when the persona card cannot be had."""
        style = cls(src, ctx.seed)
        if src.persona:
            from bot.cards import CardError
            from bot.prompt_window import TokenCounter
            from training.served import find_persona, persona_server

            if ctx.count is None:
                stats.error("source", "a persona source needs the tokenizer's token count")
                return None
            try:
                style.persona = find_persona(src.persona)
            except CardError as exc:
                stats.error("persona", str(exc))
                return None
            budget = src.prompt_budget or ctx.max_length
            count = TokenCounter(functools.lru_cache(maxsize=1 << 16)(ctx.count), ctx.fmt)
            style.server = persona_server(style.persona, count, budget)
        return style

    def apply(self, rec: Record) -> list[Record]:
        """`rec` with the source's names, system text or persona; single-turn records keep the
        model card's layout."""
        if rec.conversation is None:
            return [rec]
        name = pick_name(self.source.names, self.seed, self.source.name, rec.position)
        conv = [
            Message(m.role, m.content, name if m.role == "user" else m.name)
            for m in rec.conversation
        ]
        rec.conversation = conv
        rec.system = rec.system or self.source.system
        if self.server is None or not all(m.content.strip() for m in conv):
            return [rec]
        return served_records(rec, lambda _: self.server)


def served_records(rec: Record, server_for: Callable[[Any], Any]) -> list[Record]:
    """`rec`'s chat as the bot serves it (`training.served`): one record per example.

    The prompt is exactly the bot's (a record's own system text is not part of it). Tool turns
    (Input blocks) are not part of a Discord chat: here they are user turns named for the tool.
    """
    from bot.prompt import Turn
    from training.served import served_examples

    conv = rec.conversation or []
    turns = [Turn("user" if m.role == "input" else m.role, m.content, m.name) for m in conv]
    return [
        Record(rec.source, conversation=conv[: ex.end], segments=ex.pieces, position=rec.position)
        for ex in served_examples(turns, server_for)
    ]
