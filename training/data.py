"""Sources in, one clean instruction mix out: clean, mix, report, write.

Each source is read and normalised by `training.sources` (its formats: `training.source_formats`;
the bot's own memory: `training.memory_source`). Cleaning happens in one pass, in this order,
and every record that leaves says why: malformed -> empty output -> refusal/disclaimer ->
duplicate -> over length. Then each source is
weighted or limited (the mix), and the report tells records in and out per source and per reason.
A broken record is reported with its source and position and skipped. A source that cannot be
read, or that holds no record at all, is an error that names it (unless it says `optional:
true`): `write_prepared` then refuses to write, so the previous output stays as it was.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
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
from training.sources import load_source

RECORDS_FILE = "records.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: Upper edges of the token-length histogram buckets.
HISTOGRAM_EDGES = (128, 256, 512, 1024, 2048, 4096, 8192)


class PrepareError(ValueError):
    """`prepare` must not write: a source failed or nothing is left. Names what went wrong."""


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
