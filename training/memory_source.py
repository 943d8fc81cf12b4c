"""`format: hermes-memory`: the bot's own conversations as training data.

Reads either a `/admin memory export` file (JSONL, one stored turn a line) or the bot's SQLite
file itself (`path:` pointing at it, read through `bot.memory.Memory`), and only the channels
named in `channels:` (nothing is read by default). Turns hidden by `/admin memory forget` are left
out, and so are turns hidden from the bot ("Hide from the bot", out-of-character lines; an
export leaves those out itself). Members' names and `<@id>` mentions are replaced by pseudonyms
unless the source sets `pseudonymise: false`.

Each channel's remaining turns are cut into windows that fit `data.max_length` (a window ends
after a reply), and each window is laid out by `training.served` with the prompt the bot builds
for each reply: the default assistant's system text (`system:`, else the bot's default
SYSTEM_PROMPT), or the card of the persona the reply was written under (the turn's `persona`),
found among the server's imported personas (database only), the `personas:` card files and the
shipped personas. So the text trained before each reply is the text the bot served for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bot.cards import CardError
from bot.memory import Memory
from bot.personas import Persona, PersonaLibrary
from bot.prompt import Turn
from bot.prompt_window import TokenCounter
from bot.settings import Settings
from bot.store.db import UnusableDatabaseError
from bot.store.turns import StoredTurn
from training.config import SourceConfig
from training.records import LoadContext, Message, Record, SourceStats
from training.served import Server, persona_server, persona_table, plain_server, served_examples

SQLITE_MAGIC = b"SQLite format 3\x00"
#: An export's file name, as `/admin memory export` names it: the channel id is in it.
_EXPORT_NAME = re.compile(r"memory-(\d+)")
_MENTION = re.compile(r"<@!?(\d+)>")
#: Room left in a window for block-boundary effects and the reply header.
WINDOW_MARGIN = 16

T = TypeVar("T")


def default_system_prompt(templated: bool = False) -> str:
    """The bot's default system text (what a channel without a persona is served): SYSTEM_PROMPT,
    or in a chat template TEMPLATE_SYSTEM_PROMPT (`Settings.system_text`)."""
    return Settings().system_text(templated)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to the end from sync code, even when an event loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --------------------------------------------------------------------------------------------
# Reading turns


@dataclasses.dataclass
class Stored:
    """What a source holds: visible turns per channel, and how to find a persona by name."""

    turns: dict[int, list[StoredTurn]]
    personas: dict[tuple[int | None, str], Persona | None]


def _export_turn(raw: Any, channel: int | None) -> tuple[StoredTurn, bool]:
    """One export line as a stored turn, and whether it was forgotten. ValueError: malformed."""
    if not isinstance(raw, dict):
        raise ValueError(f"a line is {type(raw).__name__}, not an object")
    if "forgotten" not in raw:
        raise ValueError(
            "no 'forgotten' field (exported by an older bot): export the channel again, or "
            "point path: at the bot's database file"
        )
    if raw.get("role") not in ("user", "assistant") or not isinstance(raw.get("content"), str):
        raise ValueError("needs role user|assistant and text content")
    if not isinstance(raw.get("id"), int):
        raise ValueError("needs an integer id")
    channel = raw.get("channel_id", channel)
    if not isinstance(channel, int):
        raise ValueError("no channel_id (and none in the file name)")
    turn = StoredTurn(
        id=raw["id"],
        channel_id=channel,
        guild_id=raw.get("guild_id"),
        message_id=raw.get("message_id"),
        author_id=raw.get("author_id"),
        name=str(raw.get("name") or ""),
        role=raw["role"],
        persona=raw.get("persona") or None,
        content=raw["content"],
        tokens=None,
        created_at=float(raw.get("created_at") or 0.0),
    )
    return turn, bool(raw["forgotten"])


def read_export(
    path: Path, text: str, src: SourceConfig, stats: SourceStats, cards: Any
) -> Stored | None:
    m = _EXPORT_NAME.search(path.name)
    file_channel = int(m.group(1)) if m else None
    wanted = set(src.channels)
    turns: dict[int, list[StoredTurn]] = {c: [] for c in src.channels}
    forgotten = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            turn, hidden = _export_turn(json.loads(line), file_channel)
        except json.JSONDecodeError as exc:
            stats.problem(f"{path.name} line {n}", f"invalid JSON ({exc.msg})")
            continue
        except ValueError as exc:
            if "forgotten" in str(exc):  # the whole file cannot be trusted to hide them
                stats.error(f"{path.name} line {n}", str(exc))
                return None
            stats.problem(f"{path.name} line {n}", str(exc))
            continue
        if turn.channel_id not in wanted:
            continue
        if hidden:
            forgotten += 1
            continue
        turns[turn.channel_id].append(turn)
    stats.forgotten += forgotten
    names = {(t.guild_id, t.persona) for ts in turns.values() for t in ts if t.persona}
    return Stored(turns, {key: cards.get(key[1]) for key in names})


def check_bot_database(path: Path) -> None:
    """Refuse an SQLite file that is not the bot's: opening it as Memory would add the bot's
    tables to it. Read-only; raises UnusableDatabaseError."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise UnusableDatabaseError(str(exc)) from None
    if not version or "turns" not in tables:
        raise UnusableDatabaseError("an SQLite file, but not the bot's database (no turns table)")


async def read_db(path: Path, src: SourceConfig, cards: Any) -> tuple[Stored, int]:
    """The named channels' visible turns and their personas, through the bot's own Memory."""
    check_bot_database(path)
    memory = await Memory.open(path)
    try:
        library = PersonaLibrary(cards, memory)
        turns: dict[int, list[StoredTurn]] = {}
        forgotten = 0
        for channel in src.channels:
            floor = (await memory.places.channel(channel)).forget_before
            stored = await memory.turns.history(channel)
            turns[channel] = [t for t in stored if t.id > floor and not t.hidden]
            forgotten += len(stored) - len(turns[channel])
        wanted = {(t.guild_id, t.persona) for ts in turns.values() for t in ts if t.persona}
        personas = {key: await library.get(key[1], key[0]) for key in wanted}
        return Stored(turns, personas), forgotten
    finally:
        await memory.close()


# --------------------------------------------------------------------------------------------
# Pseudonyms


class Pseudonyms:
    """Stable stand-ins for members: by author id (else name), from `pool` then `User N`.

    The pool is shuffled with the seed, so the same data and seed give the same names. Message
    text gets the same treatment: `<@id>` mentions and the members' real names (whole words,
    three letters or more) become their pseudonyms.
    """

    def __init__(self, pool: list[str], seed: int, source: str) -> None:
        self.pool = list(dict.fromkeys(n.strip() for n in pool if n.strip()))
        random.Random(f"{seed}\x1f{source}").shuffle(self.pool)
        self.by_key: dict[Any, str] = {}
        self.by_id: dict[int, str] = {}
        self.by_name: dict[str, str] = {}

    def add(self, turn: StoredTurn) -> None:
        key = turn.author_id if turn.author_id is not None else turn.name.casefold()
        if key not in self.by_key:
            n = len(self.by_key)
            self.by_key[key] = self.pool[n] if n < len(self.pool) else f"User {n + 1}"
        if turn.author_id is not None:
            self.by_id[turn.author_id] = self.by_key[key]
        if len(turn.name.strip()) >= 3:
            self.by_name[turn.name.strip()] = self.by_key[key]

    def name(self, turn: StoredTurn) -> str:
        key = turn.author_id if turn.author_id is not None else turn.name.casefold()
        return self.by_key.get(key, turn.name)

    def text(self, content: str) -> str:
        content = _MENTION.sub(lambda m: self.by_id.get(int(m.group(1)), "someone"), content)
        if not self.by_name:
            return content
        names = sorted(self.by_name, key=len, reverse=True)
        pattern = re.compile(
            r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE
        )
        folded = {n.casefold(): p for n, p in self.by_name.items()}
        return pattern.sub(lambda m: folded.get(m.group(1).casefold(), m.group(1)), content)


# --------------------------------------------------------------------------------------------
# Turns -> records


def windows(
    turns: list[Turn],
    costs: list[int],
    room: int,
    build: Callable[[int, int], list[Record]],
    fits: Callable[[Record], bool],
) -> Iterator[list[Record]]:
    """The records of consecutive windows of `turns`.

    A window takes turns while their costs fit `room` and ends after a reply when it can (the
    next one starts with the message that reply did not answer yet). When a record built from
    it is still too long (a persona's lore, say), the window gives back its last exchange, and
    so on, so no reply is cut off: what a window gives back starts the next one.
    """
    start = 0
    while start < len(turns):
        end, used = start, 0
        while end < len(turns) and (end == start or used + costs[end] <= room):
            used += costs[end]
            end += 1
        if end < len(turns):
            last = max((i for i in range(start, end) if turns[i].role == "assistant"), default=-1)
            if last >= start:
                end = last + 1
        records = build(start, end)
        while not all(fits(r) for r in records):
            replies = [i + 1 for i in range(start, end - 1) if turns[i].role == "assistant"]
            if not replies:
                break  # one exchange alone: the length filter decides
            end = replies[-1]
            records = build(start, end)
        yield records
        start = end


def load_memory(src: SourceConfig, stats: SourceStats, ctx: LoadContext) -> Iterator[Record]:
    """The records of one hermes-memory source (see the module docstring)."""
    stats.format = "hermes-memory"
    if src.path is None:
        stats.error(f"dataset {src.hf}", "hermes-memory reads a file: set path:, not hf:")
        return
    path = Path(src.path)
    if not src.channels:
        stats.error(
            str(path),
            "name the channels to read with channels: [id, ...]; nothing is read by default",
        )
        return
    if ctx.count is None:
        stats.error(str(path), "hermes-memory needs the tokenizer's token count")
        return
    try:
        cards = persona_table(src.personas)
    except CardError as exc:
        stats.error("personas", str(exc))
        return
    try:
        with path.open("rb") as f:
            is_db = f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
        if is_db:
            stored, forgotten = _run(read_db(path, src, cards))
            stats.forgotten += forgotten
        else:
            read = read_export(path, path.read_text(encoding="utf-8"), src, stats, cards)
            if read is None:
                return
            stored = read
    except (OSError, UnicodeDecodeError, UnusableDatabaseError) as exc:
        stats.error(str(path), f"cannot read: {exc}")
        return
    for channel, turns in stored.turns.items():
        if not turns:
            stats.error(f"channel {channel}", "no turns (none stored, or all forgotten)")
    yield from _records(src, stats, ctx, stored)


def _records(
    src: SourceConfig, stats: SourceStats, ctx: LoadContext, stored: Stored
) -> Iterator[Record]:
    assert ctx.count is not None
    count = TokenCounter(functools.lru_cache(maxsize=1 << 16)(ctx.count), ctx.fmt)  # each turn once
    budget = src.prompt_budget or ctx.max_length
    plain = plain_server(src.system or default_system_prompt(ctx.fmt is not None), count, budget)
    servers: dict[tuple[int | None, str], Server] = {}
    missing: Counter[str] = Counter()
    for key, persona in stored.personas.items():
        if persona is not None:
            servers[key] = persona_server(persona, count, budget)
    pseudo = Pseudonyms(src.names, ctx.seed, src.name)
    for turns in stored.turns.values():
        for t in turns:
            if t.role == "user":
                pseudo.add(t)
    from bot.conversation import EMPTY_NOTICE

    for channel, stored_turns in stored.turns.items():
        by_id = {t.id: t for t in stored_turns}

        def server_for(turn: Turn, by_id: dict[int, StoredTurn] = by_id) -> Server | None:
            persona = by_id[turn.id].persona if turn.id is not None else None
            if not persona:
                return plain
            guild = by_id[turn.id].guild_id if turn.id is not None else None
            return servers.get((guild, persona))

        for t in stored_turns:
            if t.role == "assistant" and t.persona and (t.guild_id, t.persona) not in servers:
                missing[t.persona] += 1
        turns = []
        for t in stored_turns:
            name = t.name
            content = t.content
            if src.pseudonymise:
                content = pseudo.text(content)
                name = pseudo.name(t) if t.role == "user" else t.name
            turns.append(Turn(t.role, content, name, None, t.id))
        used = {server_for(t) for t in turns if t.role == "assistant"} - {None}
        fixed = max((count(s([], None).text) for s in used if s), default=0) + WINDOW_MARGIN
        costs = [count.block(t) for t in turns]

        def build(
            start: int, end: int, turns: list[Turn] = turns, channel: int = channel
        ) -> list[Record]:
            part = turns[start:end]
            examples = served_examples(
                part, server_for, skip_target=lambda reply: reply.content.strip() == EMPTY_NOTICE
            )
            return [_record(src.name, channel, part[: ex.end], ex.pieces) for ex in examples]

        def fits(record: Record) -> bool:
            return ctx.measure is None or ctx.measure(record)[0] <= ctx.max_length

        for records in windows(turns, costs, max(ctx.max_length - fixed, 1), build, fits):
            for record in records:
                stats.records_in += 1
                yield record
    for persona, n in missing.items():
        stats.problems.append(
            f"persona {persona!r}: card not found, its {n} replies kept as history only "
            "(add the card file under personas:)"
        )


def _record(source: str, channel: int, turns: list[Turn], pieces: list[tuple[str, bool]]) -> Record:
    conv = [Message(t.role, t.content, t.name if t.role == "user" else "") for t in turns]
    where = f"channel {channel} turns {turns[0].id}-{turns[-1].id}"
    return Record(source, conversation=conv, segments=pieces, position=where)
