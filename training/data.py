"""Sources in, one clean instruction mix out: normalise, clean, mix, report.

Every public instruction set has its own field names. They are all mapped onto one `Record`: an
Alpaca triple (instruction, input, output), or a multi-turn conversation for ShareGPT-style data,
which is kept as several turns so the model learns every assistant reply in context.

Cleaning happens in one pass, in this order, and every record that leaves says why:
malformed -> empty output -> refusal/disclaimer -> duplicate -> over length. Then each source is
weighted or limited (the mix), and the report tells records in and out per source and per reason.
A broken file or record is reported with its source and position and skipped; it never stops the
other sources, and `prepare` exits non-zero only when nothing at all is left.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.config import DataConfig, SourceConfig

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: Upper edges of the token-length histogram buckets.
HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)
#: How many problem positions the report lists per source (all are counted).
MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # "user" | "assistant"
    content: str


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
    position: str = ""  # where it was read, for reports; not written out

    @property
    def is_chat(self) -> bool:
        return self.conversation is not None

    def targets(self) -> list[str]:
        """The texts the model is trained to write."""
        if self.conversation is None:
            return [self.output]
        return [m.content for m in self.conversation if m.role == "assistant"]

    def texts(self) -> list[str]:
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
        return {
            "source": self.source,
            "system": self.system,
            "conversation": [asdict(m) for m in self.conversation],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        if "conversation" in data:
            turns = [Message(m["role"], m["content"]) for m in data["conversation"]]
            return cls(data["source"], conversation=turns, system=data.get("system", ""))
        return cls(data["source"], data["instruction"], data.get("input", ""), data["output"])


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


def norm_unnatural(raw: dict[str, Any], source: str) -> list[Record]:
    """Unnatural Instructions: one task instruction with several instances (and reformulations);
    each instance becomes an Alpaca record with the instance input in the Input block."""
    instruction = _text(raw, "instruction")
    items = list(raw.get("instances") or []) + list(raw.get("reformulations") or [])
    if not isinstance(raw.get("instances"), list) or not items:
        raise BadRecord("no instances")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise BadRecord("an instance is not an object")
        own = _text(item, "instruction", required=False) or instruction
        out.append(
            _single(source, own, _text(item, "input", required=False), _text(item, "output"))
        )
    return out


USER_ROLES = {"human", "user", "prompter"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model", "gpt4", "gpt-4"}


def norm_sharegpt(raw: dict[str, Any], source: str) -> list[Record]:
    """ShareGPT / WizardLM-V2: conversations [{from, value}], kept multi-turn.

    A leading assistant greeting and a trailing unanswered user turn are trimmed (nothing to learn
    from them); turns that do not alternate make the record malformed.
    """
    conv = raw.get("conversations", raw.get("conversation"))
    if not isinstance(conv, list) or not conv:
        raise BadRecord("missing conversations")
    system = ""
    turns: list[Message] = []
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
        else:
            raise BadRecord(f"turn {i} has unknown speaker {who!r}")
    while turns and turns[0].role == "assistant":
        turns.pop(0)
    while turns and turns[-1].role == "user":
        turns.pop()
    if any(a.role == b.role for a, b in zip(turns, turns[1:], strict=False)):
        raise BadRecord("speakers do not alternate")
    if not turns:
        return [Record(source, conversation=[Message("assistant", "")])]  # reported as empty
    return [Record(source, conversation=turns, system=system)]


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
    raise BadRecord(
        f"cannot tell the format from keys {sorted(raw)[:8]}; set format: in the config"
    )


# --------------------------------------------------------------------------------------------
# Reading sources


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
    errors: list[str] = field(default_factory=list)  # whole file/source unreadable

    def problem(self, position: str, reason: str) -> None:
        """A malformed record: counted, listed (the first few) and skipped."""
        self.records_in += 1
        self.dropped["malformed"] += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(f"{position}: {reason}")
        log.warning("%s %s: %s (record skipped)", self.name, position, reason)

    def error(self, position: str, reason: str) -> None:
        """A source that cannot be read at all: reported, and the other sources go on."""
        self.errors.append(f"{position}: {reason}")
        log.error("%s %s: %s (source skipped)", self.name, position, reason)


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
    except (OSError, UnicodeDecodeError) as exc:
        stats.error(str(path), f"cannot read: {exc}")
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


def load_source(src: SourceConfig, stats: SourceStats) -> Iterator[Record]:
    """Normalised records of one source, with malformed ones reported and skipped.

    With `format: auto` each record's format is read from its keys, so a file that mixes
    Alpaca and ShareGPT records works; a named format is enforced on every record.
    """
    if src.format != "auto" and src.format not in FORMATS:
        stats.error("source", f"unknown format {src.format!r}; known: {sorted(FORMATS)}")
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
            rec.system = rec.system or (src.system if rec.is_chat else "")
            stats.records_in += 1
            yield rec


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
Measure = Callable[[Record], tuple[int, int]]


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
        problems = [f"- {s.name} {p}" for s in self.sources.values() for p in s.errors + s.problems]
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


def build_mix(cfg: DataConfig, measure: Measure) -> tuple[list[Record], Report]:
    """Load, clean and mix every source; `measure` counts a record's tokens as trained."""
    report = Report()
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    mixed: list[tuple[Record, tuple[int, int]]] = []
    for src in cfg.sources:
        stats = report.sources[src.name] = SourceStats(src.name, src.format)
        kept: list[tuple[Record, tuple[int, int]]] = []
        for rec in load_source(src, stats):
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
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (RECORDS_FILE + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
    tmp.replace(out_dir / RECORDS_FILE)
    (out_dir / REPORT_JSON).write_text(json.dumps(report.to_json(), indent=2))
    (out_dir / REPORT_MD).write_text(report.markdown())


def read_prepared(out_dir: Path) -> list[Record]:
    path = out_dir / RECORDS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `python -m training prepare` first")
    with path.open(encoding="utf-8") as f:
        return [Record.from_json(json.loads(line)) for line in f if line.strip()]
