"""Engines side by side: the bot's engine against any OpenAI-compatible server, same prompts.

`hermes-bot bench --server URL` and `bench/engine.py --only 6` use it to put the engine MODEL
runs on (`ENGINE`: llamacpp for a .gguf on a CPU machine) beside servers a user might run
instead (llama.cpp's `llama-server`, `python -m llama_cpp.server`, vLLM, Ollama), each a column:

- single-stream decode tokens/s (one reply alone, after its first token);
- aggregate tokens/s with `channels` conversations asking at once, and their mean time to first
  token (each counted from its own submit);

on the same ~200-token chat prompts (`bot.benchmark.stories`: the bot's own Alpaca format, each
ending in a request for a long story so replies run to the fixed length), greedy, `tokens` reply tokens each. Rounds go
column after column so a busy machine slows every column alike; each figure is the median over
rounds, and ratios are against the first server (or the first column) measured in the same run.
Servers are reached through the bot's own `OpenAIEngine`, so each gets its own parameter names.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bot.engine import Engine, GenerationParams


@dataclass
class Column:
    """One engine's figures over the rounds (medians are what the table shows)."""

    name: str
    single_tps: list[float] = field(default_factory=list)
    aggregate_tps: list[float] = field(default_factory=list)
    mean_ttft_s: list[float] = field(default_factory=list)
    shortest_reply: int = 1 << 30  # tokens: below `tokens`, a reply ended early (EOS)

    def median(self, name: str) -> float:
        values = getattr(self, name)
        return statistics.median(values) if values else 0.0


async def measure(engine: Engine, column: Column, texts: list[str], params: GenerationParams,
                  round_no: int) -> None:  # fmt: skip
    """One round: the single stream, then every channel at once (fresh cache keys)."""
    gen = engine.generate(texts[0], params, cache_key=f"bench-single-{round_no}")
    await gen.text_all()
    s = gen.stats
    if s.first_token_at is not None and s.finished_at is not None and s.new_tokens > 1:
        column.single_tps.append((s.new_tokens - 1) / max(s.finished_at - s.first_token_at, 1e-9))
    column.shortest_reply = min(column.shortest_reply, s.new_tokens)
    t0 = time.perf_counter()
    gens = [
        engine.generate(text, params, cache_key=f"bench-{round_no}-{c}")
        for c, text in enumerate(texts[1:])
    ]
    await asyncio.gather(*(g.text_all() for g in gens))
    elapsed = time.perf_counter() - t0
    column.aggregate_tps.append(sum(g.stats.new_tokens for g in gens) / max(elapsed, 1e-9))
    ttfts = [g.stats.time_to_first_token or elapsed for g in gens]
    column.mean_ttft_s.append(statistics.fmean(ttfts))
    column.shortest_reply = min([column.shortest_reply, *(g.stats.new_tokens for g in gens)])


async def compare(
    engines: list[tuple[str, Engine]],
    make_prompts: Callable[[Callable[[str], int], int], list[str]],
    *,
    tokens: int = 64,
    channels: int = 8,
    rounds: int = 3,
) -> list[Column]:
    """Start every engine, measure `rounds` rounds column by column, close them.

    `make_prompts(count_tokens, n)` gives n different conversations (`bot.benchmark.stories`):
    per round, the first is the single stream's, the other `channels` ask at once; no
    conversation is asked twice, so no column answers from a cache of an earlier round."""
    for _, engine in engines:
        await engine.start()
    try:
        # each round its own conversations: a server's prompt cache (llama-server keeps each
        # slot's last prompt) must not turn a later round's prefill into a cache hit
        per_round = channels + 1
        texts = make_prompts(engines[0][1].count_tokens, per_round * rounds)
        params = GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)
        warm = replace(params, max_new_tokens=4)
        for _, engine in engines:  # load, allocate, first-call costs out of the way
            await engine.generate(texts[0][:200], warm).text_all()
        columns = [Column(name) for name, _ in engines]
        for r in range(rounds):
            these = texts[r * per_round : (r + 1) * per_round]
            for column, (_, engine) in zip(columns, engines, strict=True):
                await measure(engine, column, these, params, r)
        return columns
    finally:
        for _, engine in engines:
            await engine.close()


def table(columns: list[Column], *, tokens: int, channels: int, baseline: int = 0) -> str:
    """The columns as text, each figure with its ratio to column `baseline`."""
    base = columns[baseline]
    rows = [
        ("single stream decode tok/s", "single_tps", True),
        (f"{channels} channels aggregate tok/s", "aggregate_tps", True),
        (f"{channels} channels mean TTFT s", "mean_ttft_s", False),
    ]
    width = max(30, *(len(c.name) + 2 for c in columns))
    out = [f"{'':32}" + "".join(f"{c.name:>{width}}" for c in columns)]
    for label, attr, _higher in rows:
        cells = []
        for c in columns:
            value, ref = c.median(attr), base.median(attr)
            ratio = f" ({value / ref:.2f}x)" if ref and c is not base else ""
            cells.append(f"{value:.2f}{ratio}".rjust(width))
        out.append(f"{label:32}" + "".join(cells))
    out.append(
        f"{'shortest reply (tokens)':32}" + "".join(f"{c.shortest_reply:>{width}}" for c in columns)
    )
    out.append(
        f"(greedy, {tokens} reply tokens asked, medians of {len(base.single_tps)} rounds; "
        f"ratios against {base.name}, measured in the same run)"
    )
    return "\n".join(out)
