"""Benchmark: does long-term recall bring an early fact back into the prompt of a late question?

    python bench/recall.py [--channels 4] [--turns 2000] [--seed 0]

With the real Llama 2 tokenizer (../shared/fixtures/llama2-tokenizer; skipped with a message when
absent), each synthetic channel holds `--turns` Discord-like turns (the generator of
`bench/prompt_memory.py`) with 50 planted facts (a name, a city, a date, a number or a
preference, each said once in the first fifth of the channel). At the end, each fact is asked
about in other words, one question at a time, through the bot's own `Conversations.prepare`
under a 4096-token window, and we check whether the fact's turn is in the prompt
(recall@prompt) with recall on and off. Off, it is 0% by construction: the facts are far
outside the window. 15 of each channel's facts are said in the middle of a long message (250-600
words, more than the recall budget): they are reported apart, and count only when the answer
itself is in the prompt (recall shows an excerpt of such a turn around the matched words).

A second run strings the real conversations of ../shared/data/sharegpt-dummy_conversation.json
(2,000 turns of FastChat's identity chats: repetitive, so every question has many near-miss
matches) into one channel as the filler instead.

Printed: recall@prompt on/off and the prompt-build time with recall on and off (median, measured
in this process, so the ratio is what matters). Prefix reuse with recall on is measured by
`bench/prompt_memory.py --recall`, where messages and replies follow each other as in real use.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prompt_memory import NAMES, WORDS, CountingEngine, message  # noqa: E402
from recall_facts import planted_facts, said_at_length  # noqa: E402

from bot.conversation import Conversations  # noqa: E402
from bot.memory import Memory  # noqa: E402
from bot.settings import load_settings  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"
SHAREGPT = ROOT.parent / "shared" / "data" / "sharegpt-dummy_conversation.json"
CONTEXT, MAX_NEW = 4096, 400
GUILD = 1
#: Of each channel's 50 facts, how many are said inside a long message (`said_at_length`).
LONG_FACTS = 15


def synthetic_filler(rnd: random.Random, n: int) -> list[tuple[str, str, str]]:
    """(role, name, text) of `n` Discord-like turns."""
    out = []
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        out.append((role, rnd.choice(NAMES) if role == "user" else "Hermes", message(rnd)))
    return out


def sharegpt_filler(rnd: random.Random) -> list[tuple[str, str, str]]:
    """The real conversations, strung together, with a random member asking each question."""
    out = []
    for conv in json.loads(SHAREGPT.read_text()):
        for turn in conv["conversations"]:
            if turn["from"] == "human":
                out.append(("user", rnd.choice(NAMES), turn["value"]))
            else:
                out.append(("assistant", "Hermes", turn["value"]))
    return out


async def measure(
    engine: CountingEngine,
    filler: list[tuple[str, str, str]],
    rnd: random.Random,
    tmp: Path,
    label: str,
) -> dict[str, float]:
    """Plant the facts in `filler`, ask about each at the end, recall on and off."""
    facts = planted_facts(rnd)
    for i in rnd.sample(range(len(facts)), LONG_FACTS):
        facts[i] = said_at_length(facts[i], rnd, WORDS)
    early = len(filler) // 5
    slots = sorted(rnd.sample(range(early), len(facts)))
    db_path = tmp / f"{label}.db"
    memory = await Memory.open(db_path)
    results: dict[str, float] = {}
    try:
        fact_ids: list[int] = []
        pending = list(zip(slots, facts, strict=True))
        for i, (role, name, text) in enumerate(filler):
            while pending and pending[0][0] == i:
                fact = pending.pop(0)[1]
                fact_ids.append(
                    await memory.turns.add(
                        label_channel(label),
                        "user",
                        fact.said,
                        name="Mika",
                        guild_id=GUILD,
                        author_id=42,
                        tokens=engine.count_tokens(fact.said),
                    )
                )
            await memory.turns.add(
                label_channel(label),
                role,
                text,
                name=name,
                guild_id=GUILD,
                author_id=None if role == "assistant" else 7,
                tokens=engine.count_tokens(text.strip()),
            )
        for mode in ("on", "off"):
            settings = load_settings(
                env={
                    "DB_PATH": str(db_path),
                    "CONTEXT_TOKENS": str(CONTEXT),
                    "MAX_NEW_TOKENS": str(MAX_NEW),
                    "RECALL": mode,
                },
                env_file=None,
            )
            conv = Conversations(settings, memory, engine)
            hits, long_hits, times = 0, 0, []
            for fact, fact_id in zip(facts, fact_ids, strict=True):
                qid = await memory.turns.add(
                    label_channel(label),
                    "user",
                    fact.asked,
                    name="Mika",
                    guild_id=GUILD,
                    author_id=42,
                    tokens=engine.count_tokens(fact.asked),
                )
                t0 = time.perf_counter()
                job = await conv.prepare(label_channel(label), GUILD, reply_to=qid)
                times.append(time.perf_counter() - t0)
                assert job is not None
                ids = {t.id for t in job.prompt.turns} | {t.id for t in job.prompt.recalled}
                # a long turn counts only when the answer itself made it into the prompt
                found = fact_id in ids and (not fact.long or fact.answer in job.prompt.text)
                if fact.long:
                    long_hits += found
                else:
                    hits += found
                # the question leaves memory again, so each question sees the same channel
                await memory.turns.delete(qid)
            results[f"recall@prompt {mode}"] = hits / (len(facts) - LONG_FACTS)
            results[f"long recall@prompt {mode}"] = long_hits / LONG_FACTS
            results[f"prepare ms {mode}"] = statistics.median(times) * 1e3
    finally:
        await memory.close()
    return results


def label_channel(label: str) -> int:
    return 1000 + sum(map(ord, label))


async def run(args: argparse.Namespace) -> int:
    if not (TOKENIZER / "tokenizer.model").is_file():
        print(f"skipped: the Llama 2 tokenizer fixture is absent ({TOKENIZER})")
        return 0
    from transformers import AutoTokenizer

    engine = CountingEngine(AutoTokenizer.from_pretrained(TOKENIZER))
    rnd = random.Random(args.seed)
    rows: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="hermes-recall-") as tmp:
        for c in range(args.channels):
            filler = synthetic_filler(rnd, args.turns)
            rows.append(
                (f"synthetic {c + 1}", await measure(engine, filler, rnd, Path(tmp), f"s{c}"))
            )
            print(f"  {rows[-1][0]}: {rows[-1][1]}", file=sys.stderr)
        if SHAREGPT.is_file():
            filler = sharegpt_filler(rnd)
            rows.append(("sharegpt (real)", await measure(engine, filler, rnd, Path(tmp), "real")))
        else:
            print(f"(real conversations skipped: {SHAREGPT} is absent)")
    print(
        f"{args.turns} turns per synthetic channel, 50 planted facts each in the first fifth "
        f"({LONG_FACTS} of them inside a long message of 250-600 words), window {CONTEXT} "
        f"(history {CONTEXT - MAX_NEW} incl. 10% for recall)"
    )
    print("| channel | recall@prompt on | off | long turns on | off | prepare ms on | off |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['recall@prompt on']:.0%} | {r['recall@prompt off']:.0%} | "
            f"{r['long recall@prompt on']:.0%} | {r['long recall@prompt off']:.0%} | "
            f"{r['prepare ms on']:.2f} | {r['prepare ms off']:.2f} |"
        )
    synthetic = [r for label, r in rows if label.startswith("synthetic")]
    mean_on = statistics.mean(r["recall@prompt on"] for r in synthetic)
    mean_long = statistics.mean(r["long recall@prompt on"] for r in synthetic)
    print(f"synthetic mean recall@prompt of long-turn facts with recall on: {mean_long:.1%}")
    ratio = statistics.mean(r["prepare ms on"] / r["prepare ms off"] for r in synthetic)
    print(
        f"synthetic mean recall@prompt with recall on: {mean_on:.1%} (target >= 90%: "
        f"{'met' if mean_on >= 0.9 else 'MISSED'}); prepare time on/off: {ratio:.2f}x"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
