"""Benchmark: building the next prompt in a long channel (memory read + fitting).

    python bench/prompt_memory.py [--turns 2000] [--iterations 200] [--recall on|off] [--profile]
    python bench/prompt_memory.py --turns 100000 --recall on      # the long-term recall variant

With the real Llama 2 tokenizer (../shared/fixtures/llama2-tokenizer; skipped with a message when
absent) a channel of 2,000 Discord-like turns is stored in a real SQLite file through `Memory`
(with token counts, as the bot stores them), then the prompt for the next message is built with
`Conversations.prepare` under a 4096-token window (budget 4096 - 400), each iteration adding a
new user message first and the reply after, as in real use. No model is loaded: a stand-in
engine only counts tokens with the real tokenizer.

With `--recall on` the history gives 10% of the window to long-term recall, and every prompt
whose history overflows searches the channel's older turns (FTS5) first; the time from the
message event to the engine submit (storing the message + building its prompt) is printed too,
with how much of each prompt is an unchanged prefix of the next (what the engine's prefix cache
reuses).

Printed: prepare median / p99 (target: median <= 5 ms), the memory store's append rate
(turns.add) and read rate (turns.recent), and a baseline measured in this same process (one
tokenization of a whole 4k prompt) with the ratio to it, since shared machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.conversation import Conversations  # noqa: E402
from bot.memory import Memory  # noqa: E402
from bot.settings import load_settings  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"
CHANNEL = 123456789012345678
GUILD = 987654321098765432
CONTEXT, MAX_NEW = 4096, 400
TARGET_MS = 5.0

_VOCABULARY = (
    "the a to and of is it that you i for on this with just have but not be are so what was my "
    "like can do if at all we they game server bot discord music stream patch update build code "
    "python error lol lmao tbh ngl honestly actually maybe probably yeah nah thanks please help "
    "anyone know how why when where which does did doesn't can't won't I'm it's that's gonna "
    "tonight tomorrow weekend raid boss loot queue ping lag fps gpu cpu ram install config "
    "settings channel role mod admin emoji meme vibe based cringe true fair wait what really"
)
WORDS = _VOCABULARY.split()
EMOJI = ["😂", "🔥", "👀", "💀", "🙏", "✨", "😭", ":pepehands:", "<:kekw:812345678901234567>"]
NAMES = ["Alice", "bob_the_builder", "Zoë", "xX_Sniper_Xx", "Mika", "dev-guy", "Ren", "Sam"]


def message(rnd: random.Random) -> str:
    """One Discord-length message: mostly short, some paragraphs, some code, mentions, links."""
    kind = rnd.random()
    if kind < 0.45:
        n = rnd.randint(1, 12)
    elif kind < 0.85:
        n = rnd.randint(12, 60)
    elif kind < 0.97:
        n = rnd.randint(60, 250)
    else:
        lines = [
            f"    {rnd.choice(WORDS)}_{i} = {rnd.randint(0, 999)}"
            for i in range(rnd.randint(3, 20))
        ]
        return "here's my config:\n```py\n" + "\n".join(lines) + "\n```"
    words = [rnd.choice(WORDS) for _ in range(n)]
    if rnd.random() < 0.2:
        words.insert(rnd.randrange(len(words) + 1), rnd.choice(EMOJI))
    if rnd.random() < 0.1:
        words.insert(0, f"<@{rnd.randrange(10**17, 10**18)}>")
    if rnd.random() < 0.05:
        words.append("https://example.com/" + "/".join(rnd.choice(WORDS) for _ in range(3)))
    text = " ".join(words)
    if n > 80 and rnd.random() < 0.5:
        cut = len(text) // 2
        text = text[:cut] + "\n\n" + text[cut:]
    return text[0].upper() + text[1:] + rnd.choice(["", ".", "?", "!", "..."])


class CountingEngine:
    """Stands in for the model: `Conversations` only needs `count_tokens` to build prompts."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run(args: argparse.Namespace) -> int:
    if not (TOKENIZER / "tokenizer.model").is_file():
        print(f"skipped: the Llama 2 tokenizer fixture is absent ({TOKENIZER})")
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    engine = CountingEngine(tok)
    rnd = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="hermes-bench-") as tmp:
        db_path = Path(tmp) / "bench.db"
        settings = load_settings(
            env={
                "DB_PATH": str(db_path),
                "CONTEXT_TOKENS": str(CONTEXT),
                "MAX_NEW_TOKENS": str(MAX_NEW),
                "RECALL": args.recall,
            },
            env_file=None,
        )
        memory = await Memory.open(db_path)
        try:
            # ---- the channel: 2,000 turns, tokens counted up front (as record_* does) ------
            rows = []
            for i in range(args.turns):
                text = message(rnd)
                role = "user" if i % 2 == 0 else "assistant"
                name = rnd.choice(NAMES) if role == "user" else "Hermes"
                rows.append((role, text, name, engine.count_tokens(text.strip())))
            start = time.perf_counter()
            for i, (role, text, name, tokens) in enumerate(rows):
                await memory.turns.add(
                    CHANNEL,
                    role,
                    text,
                    name=name,
                    guild_id=GUILD,
                    message_id=10**15 + i,
                    tokens=tokens,
                )
            append_s = time.perf_counter() - start
            # a little noise from other channels, interleaved in the same table
            for i in range(args.turns // 4):
                await memory.turns.add(CHANNEL + 1 + i % 7, "user", message(rnd), tokens=20)

            budget = CONTEXT - MAX_NEW
            reads, read_rows = 0, 0
            start = time.perf_counter()
            while time.perf_counter() - start < 1.0 or reads < 50:
                got = await memory.turns.recent(CHANNEL, token_budget=budget)
                reads += 1
                read_rows += len(got)
            read_s = time.perf_counter() - start

            # ---- the measured loop: a new message arrives, its prompt is built, a reply stored
            conv = Conversations(settings, memory, engine)
            texts = [message(rnd) for _ in range(args.iterations)]
            replies = [message(rnd) for _ in range(args.iterations)]
            counts = [engine.count_tokens(t.strip()) for t in texts]
            reply_counts = [engine.count_tokens(t.strip()) for t in replies]
            timings: list[float] = []
            event_to_submit: list[float] = []
            recalled: list[int] = []
            reused: list[float] = []
            starts: list[int | None] = []
            prompt_tokens: list[int] = []
            profiler = cProfile.Profile() if args.profile else None
            last_text = ""
            for i in range(args.iterations):
                t_event = time.perf_counter()
                turn_id = await memory.turns.add(
                    CHANNEL,
                    "user",
                    texts[i],
                    name=rnd.choice(NAMES),
                    guild_id=GUILD,
                    tokens=counts[i],
                )
                if profiler:
                    profiler.enable()
                t0 = time.perf_counter()
                job = await conv.prepare(CHANNEL, GUILD, reply_to=turn_id)
                timings.append(time.perf_counter() - t0)
                event_to_submit.append(time.perf_counter() - t_event)
                if profiler:
                    profiler.disable()
                assert job is not None
                starts.append(job.prompt.start_id)
                prompt_tokens.append(job.prompt.tokens)
                recalled.append(len(job.prompt.recalled))
                if last_text:
                    # the share of the previous prompt (up to its Response header) that this one
                    # starts with: what a prefix cache keeps from one message to the next
                    head = last_text[: last_text.rindex("### Response:")]
                    reused.append(len(os.path.commonprefix([head, job.prompt.text])) / len(head))
                last_text = job.prompt.text
                await memory.turns.add(
                    CHANNEL,
                    "assistant",
                    replies[i],
                    name="Hermes",
                    guild_id=GUILD,
                    tokens=reply_counts[i],
                )

            # ---- baseline in this process: tokenize one whole 4k prompt ------------------
            base = []
            for _ in range(30):
                t0 = time.perf_counter()
                real = len(tok(last_text).input_ids)
                base.append(time.perf_counter() - t0)
            baseline = statistics.median(base)
        finally:
            await memory.close()

    median, p99 = statistics.median(timings), percentile(timings, 0.99)
    rebuilt = sum(1 for a, b in zip(starts, starts[1:], strict=False) if a != b)
    print(
        f"channel: {args.turns} stored turns (+{args.turns // 4} in other channels), "
        f"window {CONTEXT} tokens, budget {budget}, {args.iterations} iterations"
    )
    print(
        f"prepare (turns.recent + fit_prompt): median {median * 1e3:.2f} ms, "
        f"p99 {percentile(timings, 0.99) * 1e3:.2f} ms, max {max(timings) * 1e3:.2f} ms "
        f"(target median <= {TARGET_MS:g} ms: {'met' if median * 1e3 <= TARGET_MS else 'MISSED'})"
    )
    print(
        f"  prompt: median {statistics.median(prompt_tokens):.0f} tokens (estimate); the last "
        f"one {prompt_tokens[-1]} estimated, {real} real with BOS (budget {budget}); the start "
        f"moved {rebuilt} times in {args.iterations - 1} messages (cache-friendly fitting)"
    )
    print(
        f"recall {args.recall}: message event -> engine submit (add_turn + prepare) median "
        f"{statistics.median(event_to_submit) * 1e3:.2f} ms, p99 "
        f"{percentile(event_to_submit, 0.99) * 1e3:.2f} ms; recalled turns per prompt: median "
        f"{statistics.median(recalled):.0f}; previous prompt kept as prefix: median "
        f"{statistics.median(reused):.1%}, mean {statistics.mean(reused):.1%}"
    )
    print(
        f"baseline: tokenizing the whole last prompt once: {baseline * 1e3:.2f} ms; "
        f"prepare median / baseline = {median / baseline:.2f}x, p99 / baseline = "
        f"{p99 / baseline:.2f}x"
    )
    print(
        f"memory append: {args.turns / append_s:,.0f} turns/s via add_turn "
        f"({append_s / args.turns * 1e3:.3f} ms each, one transaction per turn)"
    )
    print(
        f"memory read: {reads / read_s:,.0f} turns.recent calls/s, "
        f"{read_rows / read_s:,.0f} rows/s ({read_rows / reads:.0f} rows per call)"
    )
    if profiler is not None or median * 1e3 > TARGET_MS:
        if profiler is None:
            print("median above target; rerun with --profile to see where the time goes")
        else:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
            print(out.getvalue())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--recall", choices=("on", "off"), default="off", help="long-term recall (RECALL)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the measured loop")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
