"""Sources in, one clean instruction mix out: normalise, clean, mix, report.

Every public instruction set has its own field names. They are all mapped onto one `Record`: an
Alpaca triple (instruction, input, output), or a multi-turn conversation for ShareGPT-style data,
which is kept as several turns so the model learns every assistant reply in context.

Chats are trained on the text the bot serves: user turns carry a speaker name (`alice: ...`),
which a source can set (`names:`, fixed or drawn per conversation), and a source with a
`persona:` card, like the bot's own memory (`format: hermes-memory`, see
`training.memory_source`), is rendered reply by reply with the bot's prompt builders
(`training.served`): such a record carries its exact text pieces (`segments`).

Cleaning happens in one pass, in this order, and every record that leaves says why:
malformed -> empty output -> refusal/disclaimer -> duplicate -> over length. Then each source is
weighted or limited (the mix), and the report tells records in and out per source and per reason.
A broken record is reported with its source and position and skipped. A source that cannot be
read, or that holds no record at all, is an error that names it (unless it says `optional:
true`): `write_prepared` then refuses to write, so the previous output stays as it was.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from training.config import DataConfig, SourceConfig
from training.records import (  # noqa: F401 - the record types, long importable from here
    MAX_LISTED_PROBLEMS,
    ROLES,
    LoadContext,
    Measure,
    Message,
    Record,
    SourceStats,
)

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: Upper edges of the token-length histogram buckets.
HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)


class PrepareError(ValueError):
    """`prepare` must not write: a source failed or nothing is left. Names what went wrong."""


class BadRecord(ValueError):
    """A record that does not have the shape its format promises."""


# --------------------------------------------------------------------------------------------
# Normalisers: one raw record of a source format -> Records


def _text(raw: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise BadRecord(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is {type(value).__name__}, not text")
    return value.strip()


def _single(source: str, instruction: str, context: str, output: str) -> Record:
    if not instruction:
        raise BadRecord("empty instruction")
    return Record(source, instruction, context, output)


def norm_alpaca(raw: dict[str, Any], source: str) -> list[Record]:
    """Alpaca, GPT-4-LLM, CodeAlpaca (instruction, input, output); WizardLM (no input)."""
    return [
        _single(
            source,
            _text(raw, "instruction"),
            _text(raw, "input", required=False),
            _text(raw, "output"),
        )
    ]


def norm_response(raw: dict[str, Any], source: str) -> list[Record]:
    """GPTeacher (instruction, input, response) and Airoboros (instruction, response)."""
    return [
        _single(
            source,
            _text(raw, "instruction"),
            _text(raw, "input", required=False),
            _text(raw, "response"),
        )
    ]


def norm_camel(raw: dict[str, Any], source: str) -> list[Record]:
    """Camel-AI: message_1 is the question, message_2 the answer."""
    return [_single(source, _text(raw, "message_1"), "", _text(raw, "message_2"))]


#: What Unnatural Instructions writes in `constraints` when there are none.
_NO_CONSTRAINTS = {"", "none", "none.", "n/a"}


def norm_unnatural(raw: dict[str, Any], source: str) -> list[Record]:
    """Unnatural Instructions: one task with several instances (and reformulations).

    Each instance becomes one Alpaca record whose instruction is the instance's own
    `instruction_with_input` (the task with this input written in), followed by its
    `constraints` when it has real ones. The task-level `instruction` is a template (the
    reformulations' ones hold an `{INPUT}` placeholder), used only for an instance without
    `instruction_with_input`: the placeholder is filled, else the input goes in the Input block.
    """
    task = _text(raw, "instruction", required=False)
    items = list(raw.get("instances") or []) + list(raw.get("reformulations") or [])
    if not isinstance(raw.get("instances"), list) or not items:
        raise BadRecord("no instances")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRecord("an instance is not an object")
        given = _text(item, "input", required=False)
        prompt, context = _text(item, "instruction_with_input", required=False), ""
        if not prompt:
            template = _text(item, "instruction", required=False) or task
            if "{INPUT}" in template:
                prompt = template.replace("{INPUT}", given)
            else:
                prompt, context = template, given
        constraints = _text(item, "constraints", required=False)
        if constraints.lower() not in _NO_CONSTRAINTS:
            prompt = f"{prompt}\n\n{constraints}"
        out.append(_single(source, prompt, context, _text(item, "output")))
    return out


USER_ROLES = {"human", "user", "prompter"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model", "gpt4", "gpt-4"}
#: Tool-use speakers (a call and its result): kept as Input blocks, never trained.
TOOL_ROLES = {
    "function_call",
    "function-call",
    "observation",
    "function",
    "function_response",
    "tool",
    "tool_call",
    "tool_calls",
    "tool_response",
    "ipython",
}


def norm_sharegpt(raw: dict[str, Any], source: str) -> list[Record]:
    """ShareGPT / WizardLM-V2: conversations [{from, value}], kept multi-turn.

    Tool turns (`function_call`, `observation`, ...) and a record's `tools` list become Input
    blocks between the turns; a turn with any other unknown speaker is left out and counted, the
    rest of the conversation is kept. A leading assistant greeting and a trailing unanswered user
    turn are trimmed (nothing to learn from them); two user turns in a row, or two replies with
    nothing between them, make the record malformed.
    """
    conv = raw.get("conversations", raw.get("conversation"))
    if not isinstance(conv, list) or not conv:
        raise BadRecord("missing conversations")
    system = ""
    turns: list[Message] = []
    skipped: Counter[str] = Counter()
    if (tools := raw.get("tools")) and isinstance(tools, str | list | dict):
        text = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        turns.append(Message("input", text.strip(), "tools"))
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {i} is not an object")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        text = _text(turn, "value" if "value" in turn else "content")
        if who == "system":
            system = text
        elif who in USER_ROLES:
            turns.append(Message("user", text))
        elif who in ASSISTANT_ROLES:
            turns.append(Message("assistant", text))
        elif who in TOOL_ROLES:
            turns.append(Message("input", text, who))
        else:
            skipped[who or "(none)"] += 1
    first_user = next((i for i, m in enumerate(turns) if m.role == "user"), len(turns))
    turns = [m for m in turns[:first_user] if m.role == "input"] + turns[first_user:]
    last_reply = max((i for i, m in enumerate(turns) if m.role == "assistant"), default=-1)
    turns = turns[: last_reply + 1]
    spoken = [m.role for m in turns if m.role != "input"]
    replies_back_to_back = any(a.role == b.role == "assistant" for a, b in pairwise(turns))
    if replies_back_to_back or any(a == b == "user" for a, b in pairwise(spoken)):
        raise BadRecord("speakers do not alternate")
    if not turns:
        return [Record(source, conversation=[Message("assistant", "")])]  # reported as empty
    return [Record(source, conversation=turns, system=system, skipped_turns=skipped)]


FORMATS: dict[str, Callable[[dict[str, Any], str], list[Record]]] = {
    "alpaca": norm_alpaca,
    "gpt4-llm": norm_alpaca,
    "codealpaca": norm_alpaca,
    "wizardlm": norm_alpaca,
    "gpteacher": norm_response,
    "airoboros": norm_response,
    "camel": norm_camel,
    "unnatural": norm_unnatural,
    "sharegpt": norm_sharegpt,
    "wizardlm-v2": norm_sharegpt,
}


#: Formats read by their own loader rather than record by record (see `load_source`).
MEMORY_FORMAT = "hermes-memory"


def detect_format(raw: dict[str, Any]) -> str:
    """Guess a source's format from the keys of its first record."""
    if "conversations" in raw or "conversation" in raw:
        return "sharegpt"
    if "message_1" in raw and "message_2" in raw:
        return "camel"
    if "instances" in raw:
        return "unnatural"
    if "instruction" in raw and "response" in raw:
        return "gpteacher"
    if "instruction" in raw and "output" in raw:
        return "alpaca"
    if {"role", "content", "persona"} <= raw.keys():
        raise BadRecord(
            "a /admin memory export line: set format: hermes-memory and channels: [id, ...]"
        )
    raise BadRecord(
        f"cannot tell the format from keys {sorted(raw)[:8]}; set format: in the config"
    )


# --------------------------------------------------------------------------------------------
# Reading sources


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


# --------------------------------------------------------------------------------------------
# Cleaning


_SPACE = re.compile(r"\s+")


def dedup_key(record: Record) -> str:
    """Exact-duplicate key: the record's texts, lowercased with whitespace collapsed."""
    return "\x1f".join(_SPACE.sub(" ", t).strip().lower() for t in record.texts())


def refusal_match(record: Record, phrases: list[str]) -> str | None:
    """The first refusal/disclaimer phrase found in any target text, or None."""
    for target in record.targets():
        low = target.lower()
        for phrase in phrases:
            if phrase and phrase.lower() in low:
                return phrase
    return None


#: (tokens, target tokens) of a record exactly as it will be trained.


def fit_length(
    record: Record, measure: Measure, max_length: int, policy: str
) -> tuple[Record | None, bool, tuple[int, int]]:
    """(record that fits or None, whether it was truncated, its (tokens, target tokens)).

    Truncation only cuts whole exchanges from the end of a conversation, so no reply is ever
    trained half-finished; a single-turn record that is too long is dropped.
    """
    size = measure(record)
    if size[0] <= max_length:
        return record, False, size
    if policy != "truncate" or record.conversation is None:
        return None, False, size
    if record.segments is not None:  # served pieces: end after an earlier target
        ends = [i + 1 for i, (_, target) in enumerate(record.segments) if target][:-1]
        for end in reversed(ends):
            shorter = Record(
                record.source,
                conversation=record.conversation,
                segments=record.segments[:end],
                position=record.position,
            )
            if (size := measure(shorter))[0] <= max_length:
                return shorter, True, size
        return None, False, size
    turns = record.conversation
    for end in range(len(turns) - 2, 0, -2):  # keep turns[:end], ending with an assistant turn
        shorter = Record(
            record.source, conversation=turns[:end], system=record.system, position=record.position
        )
        if (size := measure(shorter))[0] <= max_length:
            return shorter, True, size
    return None, False, size


@dataclass
class Report:
    sources: dict[str, SourceStats] = field(default_factory=dict)
    histogram: dict[str, int] = field(default_factory=dict)  # "<=edge" -> records
    tokens: int = 0
    target_tokens: int = 0
    records_out: int = 0

    def failures(self) -> list[str]:
        """Why `prepare` must not write: each required source that failed, or no records."""
        out = [
            f"source {s.name!r} {e}"
            for s in self.sources.values()
            if not s.optional
            for e in s.errors
        ]
        if not self.records_out:
            out.append("no records left")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "records_out": self.records_out,
            "tokens": self.tokens,
            "target_tokens": self.target_tokens,
            "histogram": self.histogram,
            "sources": {
                n: {
                    "format": s.format,
                    "records_in": s.records_in,
                    "dropped": dict(s.dropped),
                    "truncated": s.truncated,
                    "mix_delta": s.mix_delta,
                    "records_out": s.records_out,
                    "problems": s.problems,
                    "errors": s.errors,
                    "optional": s.optional,
                    "skipped_turns": dict(s.skipped_turns),
                    "forgotten": s.forgotten,
                }
                for n, s in self.sources.items()
            },
        }

    def markdown(self) -> str:
        reasons = sorted({r for s in self.sources.values() for r in s.dropped})
        head = ["source", "format", "in", *reasons, "truncated", "mix", "out"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.sources.values():
            row = [
                s.name,
                s.format or "-",
                str(s.records_in),
                *(str(s.dropped[r]) for r in reasons),
                str(s.truncated),
                f"{s.mix_delta:+d}",
                str(s.records_out),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            f"records out: {self.records_out}, tokens: {self.tokens}, "
            f"target tokens: {self.target_tokens}",
            "",
            "| tokens | records |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v} |" for k, v in self.histogram.items()]
        problems = [
            f"- {s.name} {p}{' (optional: skipped)' if s.optional else ''}"
            for s in self.sources.values()
            for p in s.errors
        ]
        problems += [f"- {s.name} {p}" for s in self.sources.values() for p in s.problems]
        problems += [
            f"- {s.name}: {n} turn(s) with unknown speaker {who!r} left out"
            for s in self.sources.values()
            for who, n in s.skipped_turns.items()
        ]
        problems += [
            f"- {s.name}: {s.forgotten} forgotten turn(s) left out"
            for s in self.sources.values()
            if s.forgotten
        ]
        if problems:
            lines += ["", "Problems (first few per source):", *problems]
        return "\n".join(lines) + "\n"


def histogram(lengths: list[int], max_length: int) -> dict[str, int]:
    """Records per token-length bucket, buckets doubling from 128 up to `max_length`."""
    edges = [e for e in HISTOGRAM_EDGES if e < max_length] + [max_length]
    counts = dict.fromkeys((f"<={e}" for e in edges), 0)
    for n in lengths:
        key = next((f"<={e}" for e in edges if n <= e), f">{max_length}")
        counts[key] = counts.get(key, 0) + 1
    return counts


def mix_indices(n: int, src: SourceConfig, rng: random.Random) -> list[int]:
    """Which of a source's `n` cleaned records go into the mix: `weight` is the share to keep
    (<1, sampled) or a repeat factor (>1), then `limit` caps the count."""
    target = round(n * src.weight)
    if src.limit is not None:
        target = min(target, src.limit)
    if target <= n:
        return sorted(rng.sample(range(n), target))
    copies, rest = divmod(target, n)
    return list(range(n)) * copies + sorted(rng.sample(range(n), rest))


def build_mix(
    cfg: DataConfig, measure: Measure, count: Callable[[str], int] | None = None
) -> tuple[list[Record], Report]:
    """Load, clean and mix every source; `measure` counts a record's tokens as trained.

    `count` is the tokenizer's plain token count, which the bot's prompt builders use to fit
    persona prompts; by default it is taken from `measure`'s encoder (`Encoder.measure`).
    """
    encoder = getattr(measure, "__self__", None)
    if count is None:
        count = getattr(encoder, "count_tokens", None)
    ctx = LoadContext(
        count=count,
        measure=measure,
        max_length=cfg.max_length,
        seed=cfg.seed,
        fmt=getattr(encoder, "fmt", None),
    )
    report = Report()
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    mixed: list[tuple[Record, tuple[int, int]]] = []
    for src in cfg.sources:
        stats = report.sources[src.name] = SourceStats(src.name, src.format)
        kept: list[tuple[Record, tuple[int, int]]] = []
        for rec in load_source(src, stats, ctx):
            if not all(t.strip() for t in rec.targets()):
                stats.dropped["empty_output"] += 1
                continue
            if cfg.refusal_filter and refusal_match(rec, cfg.refusal_phrases):
                stats.dropped["refusal"] += 1
                continue
            if cfg.dedup:
                key = dedup_key(rec)
                if key in seen:
                    stats.dropped["duplicate"] += 1
                    continue
                seen.add(key)
            fitted, truncated, size = fit_length(rec, measure, cfg.max_length, cfg.overlength)
            if fitted is None:
                stats.dropped["overlength"] += 1
                continue
            stats.truncated += truncated
            kept.append((fitted, size))
        chosen = [kept[i] for i in mix_indices(len(kept), src, rng)]
        stats.mix_delta = len(chosen) - len(kept)
        stats.records_out = len(chosen)
        mixed += chosen
    rng.shuffle(mixed)
    report.records_out = len(mixed)
    report.tokens = sum(n for _, (n, _) in mixed)
    report.target_tokens = sum(t for _, (_, t) in mixed)
    report.histogram = histogram([n for _, (n, _) in mixed], cfg.max_length)
    return [r for r, _ in mixed], report


def write_prepared(out_dir: Path, records: list[Record], report: Report) -> None:
    """Write records and report, or nothing at all.

    Raises `PrepareError` (naming each failed source) when the report has failures. Otherwise
    everything is written into a fresh temporary folder beside `out_dir` and moved over the
    old files only once all of it is written, so a failed or interrupted run leaves the
    previous output as it was.
    """
    if failures := report.failures():
        raise PrepareError(
            f"nothing written, {out_dir} keeps its previous output: " + "; ".join(failures)
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        with (tmp / RECORDS_FILE).open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
        (tmp / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2))
        (tmp / REPORT_MD).write_text(report.markdown())
        for name in (RECORDS_FILE, REPORT_JSON, REPORT_MD):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_prepared(out_dir: Path) -> list[Record]:
    path = out_dir / RECORDS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m training prepare` first")
    with path.open(encoding="utf-8") as f:
        return [Record.from_json(json.loads(line)) for line in f if line.strip()]
