"""`hermes-bot bench`: what this machine does with MODEL, measured the way the bot serves it.

llama.cpp users have `llama-bench` and vLLM users its benchmark scripts; this is ours. It loads
MODEL exactly as `hermes-bot run` does (the same settings: quantization, dtype, device map,
MAX_BATCH, KV_CACHE_MB) through the bot's own engine, then measures:

- load time and memory (GPU memory on CUDA; process memory and weights on the CPU);
- single-stream decode tokens/s (one reply alone, after its first token);
- aggregate tokens/s with 1, 2, 4, 8 ... MAX_BATCH channels asking at once;
- time to first token for a message in a channel with ~3,500 tokens of history, cold against
  with the channel's cached prefix (the history is scaled down to fit a smaller window);
- a recommendation for MAX_BATCH and KV_CACHE_MB from the memory it saw.

Also the place the benchmark prompts are made (`chatter`, `history`), so `bench/engine.py`
builds the same conversations.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from bot.engine import EngineError, GenerationParams, LocalEngine, make_engine, params_from_settings
from bot.prompt import RESPONSE, Turn, render_chat

MIB = 1 << 20
HISTORY_TOKENS = 3500  # the issue's "long channel": most of Llama 2's 4,096-token window
SYSTEM = "You are Hermes, a helpful, witty assistant chatting in a Discord server."
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "discord",
    "bots",
    "answer",
    "questions",
    "about",
    "code",
    "music",
    "games",
    "weather",
    "python",
    "print",
    "hello",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "thank",
    "you",
    "server",
    "channel",
    "message",
    "reply",
    "model",
    "token",
    "cache",
    "batch",
    "prompt",
    "history",
    "turn",
    "user",
    "assistant",
]


def chatter(seed: int, words: int) -> str:
    """Deterministic filler text that tokenises like chat (spaces, punctuation, names)."""
    out = []
    x = seed * 7919 + 17
    for i in range(words):
        x = (x * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[x % len(WORDS)])
        if i % 11 == 10:
            out[-1] += "."
    return " ".join(out)


def history(count: Callable[[str], int], target_tokens: int, seed: int = 0) -> list[Turn]:
    """Alternating user/assistant turns, oldest first, totalling about `target_tokens`."""
    turns: list[Turn] = []
    i = 0
    while count(render_chat(SYSTEM, turns)) < target_tokens:
        if i % 2 == 0:
            turns.append(Turn("user", chatter(seed * 1000 + i, 25), f"User{i % 5}"))
        else:
            turns.append(Turn("assistant", chatter(seed * 1000 + i, 30)))
        i += 1
    return turns


#: The last message of each side-by-side conversation: a reply that runs to the fixed length.
STORY = "Write a long story about a dragon who learns to bake bread. Make it very detailed."


def stories(count: Callable[[str], int], n: int) -> list[str]:
    """`n` different ~200-token conversations, each ending with a request for a long story."""
    return [
        render_chat(SYSTEM, [*history(count, 180, seed=300 + c), Turn("user", STORY, "alice")])
        for c in range(n)
    ]


def next_message(prompt: str, reply: str, k: int) -> str:
    """`prompt` (ending in an open response) with `reply` and one more user message appended."""
    return f"{prompt}{reply}\n\n### Instruction:\nUser{k}: {chatter(k, 12)}\n\n{RESPONSE}"


def concurrency_levels(max_batch: int) -> list[int]:
    """1, 2, 4, 8 ... below `max_batch`, then `max_batch` itself."""
    levels = [1 << i for i in range(max(max_batch, 1).bit_length()) if 1 << i < max_batch]
    return [*levels, max(max_batch, 1)]


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class MemorySeen:
    device: str
    weights_mb: float
    process_peak_mb: float
    gpu_after_load_mb: float | None = None
    gpu_peak_mb: float | None = None
    gpu_total_mb: float | None = None
    ram_available_mb: float | None = None


@dataclass
class Level:
    channels: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class FirstToken:
    history_tokens: int  # prompt tokens of the measured message
    target_tokens: int  # the history asked for (3,500, or less to fit the window)
    window: int
    scaled: bool
    cold_ms: float
    cached_ms: float | None  # None when the prefix cache is off (KV_CACHE_MB=0)
    reused_tokens: int


@dataclass
class Recommendation:
    max_batch: int
    kv_cache_mb: int
    reason: str


@dataclass
class BenchReport:
    model: str
    device: str
    dtype: str
    quantization: str
    max_batch: int
    kv_cache_mb: int
    torch_threads: int
    load_s: float
    memory: MemorySeen
    single_stream_tps: float
    single_stream_tokens: int
    levels: list[Level] = field(default_factory=list)
    first_token: FirstToken | None = None
    recommendation: Recommendation | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for level, row in zip(self.levels, out["levels"], strict=True):
            row["tokens_per_s"] = round(level.tokens_per_s, 2)
        return out

    def table(self) -> str:
        return "\n".join(table_lines(self))


def bar(value: float, best: float, width: int = 24) -> str:
    """A text bar, `width` cells for `best`."""
    cells = 0 if best <= 0 else round(width * value / best)
    return "█" * cells + "·" * (width - cells)


def table_lines(r: BenchReport) -> Iterator[str]:
    m = r.memory
    yield f"hermes-bot bench: {r.model}"
    yield (
        f"  {r.device}, {r.dtype}, quantization {r.quantization}, MAX_BATCH={r.max_batch}, "
        f"KV_CACHE_MB={r.kv_cache_mb}, torch threads {r.torch_threads}"
    )
    yield f"load            {r.load_s:8.2f} s   weights {m.weights_mb:,.1f} MB"
    if m.gpu_total_mb is not None:
        yield (
            f"GPU memory      after load {m.gpu_after_load_mb:,.0f} MB, peak {m.gpu_peak_mb:,.0f} "
            f"MB of {m.gpu_total_mb:,.0f} MB"
        )
    yield f"process memory  peak {m.process_peak_mb:,.0f} MB"
    yield (
        f"single stream   {r.single_stream_tps:8.1f} tokens/s  "
        f"(decode, one reply of {r.single_stream_tokens} tokens)"
    )
    if r.levels:
        best = max(level.tokens_per_s for level in r.levels)
        base = r.levels[0].tokens_per_s
        yield "channels  tokens/s   x 1 channel  tokens"
        for level in r.levels:
            tps = level.tokens_per_s
            yield (
                f"{level.channels:>8}  {tps:8.1f}   {tps / max(base, 1e-9):9.2f}x  "
                f"{level.tokens:>6}  {bar(tps, best)}"
            )
    if (f := r.first_token) is not None:
        scaled = (
            f" (scaled down from {HISTORY_TOKENS:,} to fit the {f.window:,}-token window)"
            if f.scaled
            else ""
        )
        yield f"time to first token, {f.history_tokens:,}-token prompt{scaled}:"
        if f.cached_ms is None:
            yield f"  cold {f.cold_ms:.1f} ms; cached prefix: off (KV_CACHE_MB=0)"
        else:
            yield (
                f"  cold {f.cold_ms:.1f} ms, with the channel's cached prefix {f.cached_ms:.1f} ms "
                f"({f.cached_ms / max(f.cold_ms, 1e-9):.2f}x, {f.reused_tokens:,} tokens reused)"
            )
    if (rec := r.recommendation) is not None:
        yield f"recommendation: MAX_BATCH={rec.max_batch} KV_CACHE_MB={rec.kv_cache_mb}"
        yield f"  {rec.reason}"


# --------------------------------------------------------------------------------------------
# Measuring


class Progress:
    """A progress bar on stderr over the bench's steps (tqdm), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, file=sys.stderr, unit="step", leave=False)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self._bar is not None:
            self._bar.set_description(name)
        yield
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024


def ram_available_mb() -> float | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MIB
    except (ValueError, OSError, AttributeError):
        return None


def window_of(engine: LocalEngine, context_tokens: int) -> int:
    cfg = engine.model.config.get_text_config(decoder=True)
    limit = getattr(cfg, "max_position_embeddings", None) or context_tokens
    return min(context_tokens, int(limit))


async def single_stream(engine: LocalEngine, params: GenerationParams) -> tuple[float, int]:
    prompt = render_chat(SYSTEM, history(engine.count_tokens, 200, seed=7))
    gen = engine.generate(prompt, params)
    await gen.text_all()
    s = gen.stats
    if s.first_token_at is None or s.finished_at is None or s.new_tokens < 2:
        return s.tokens_per_s, s.new_tokens
    return (s.new_tokens - 1) / max(s.finished_at - s.first_token_at, 1e-9), s.new_tokens


async def aggregate(engine: LocalEngine, channels: int, params: GenerationParams) -> Level:
    prompts = [
        render_chat(SYSTEM, history(engine.count_tokens, 200, seed=100 + c))
        for c in range(channels)
    ]
    t0 = time.perf_counter()
    gens = [engine.generate(p, replace(params, seed=c)) for c, p in enumerate(prompts)]
    await asyncio.gather(*(g.text_all() for g in gens))
    return Level(channels, sum(g.stats.new_tokens for g in gens), time.perf_counter() - t0)


async def first_token(engine: LocalEngine, window: int, trials: int, cache_on: bool) -> FirstToken:
    reply_tokens = 16
    margin = 64 + reply_tokens * (trials + 2) + 40 * (trials + 1)  # new messages and replies
    target = min(HISTORY_TOKENS, window - margin)
    if target < 64:
        raise EngineError(f"the model's window ({window} tokens) is too small to measure")
    short = GenerationParams(max_new_tokens=reply_tokens, seed=5)  # same reply cold or warm
    prompt = render_chat(SYSTEM, history(engine.count_tokens, target, seed=99))
    reply = await engine.generate(prompt, short, cache_key="bench-ttft").text_all()
    cold, warm, reused, sizes = [], [], [], []
    for k in range(trials):
        prompt = next_message(prompt, reply, k)
        c = engine.generate(prompt, short)  # no cache key: computed from scratch
        await c.text_all()
        cold.append(ttft(c.stats))
        sizes.append(c.stats.prompt_tokens)
        w = engine.generate(prompt, short, cache_key="bench-ttft")
        reply = await w.text_all()
        warm.append(ttft(w.stats))
        reused.append(w.stats.reused_tokens)
    return FirstToken(
        history_tokens=max(sizes),
        target_tokens=target,
        window=window,
        scaled=target < HISTORY_TOKENS,
        cold_ms=statistics.median(cold) * 1000,
        cached_ms=statistics.median(warm) * 1000 if cache_on else None,
        reused_tokens=min(reused),
    )


def ttft(stats: Any) -> float:
    """Time to first text; a reply that ended before any text counts its whole time."""
    t = stats.time_to_first_token
    return t if t is not None else stats.finished_at - stats.queued_at


def recommend(
    memory: MemorySeen, levels: list[Level], bytes_per_token: int, window: int
) -> Recommendation:
    """MAX_BATCH and KV_CACHE_MB for this machine, from the memory and throughput seen.

    KV room: on a GPU, 90% of the card less the peak the bench reached (weights, activations
    and the bench's own KV: conservative); on the CPU, half the RAM available now. MAX_BATCH is
    the smaller of what that room holds at full windows and the fewest channels that reached
    90% of the best aggregate throughput.
    """
    if memory.gpu_total_mb is not None and memory.gpu_peak_mb is not None:
        room = 0.9 * memory.gpu_total_mb - memory.gpu_peak_mb
        where = f"90% of {memory.gpu_total_mb:,.0f} MB GPU memory less the {memory.gpu_peak_mb:,.0f} MB peak seen"
    else:
        avail = memory.ram_available_mb or 0.0
        room = 0.5 * avail
        where = f"half the {avail:,.0f} MB of RAM available"
    room = max(room, 0.0)
    kv_mb = int(room // 256 * 256) if room >= 512 else int(room)
    per_seq_mb = window * bytes_per_token / MIB
    by_memory = max(1, min(256, int(kv_mb // max(per_seq_mb, 1e-9))))
    best = max((lv.tokens_per_s for lv in levels), default=0.0)
    knee = next((lv.channels for lv in levels if lv.tokens_per_s >= 0.9 * best), 1)
    rising = bool(levels) and knee == levels[-1].channels and len(levels) > 1
    max_batch = max(1, min(by_memory, knee))
    reason = (
        f"KV room {kv_mb:,} MB ({where}); a full {window:,}-token window takes "
        f"{per_seq_mb:,.1f} MB, so {by_memory} fit; throughput reached 90% of its best at "
        f"{knee} channel{'s' if knee != 1 else ''}"
    )
    if rising and by_memory > knee:
        reason += f" and was still rising: try MAX_BATCH={min(by_memory, 2 * knee)}"
    return Recommendation(max_batch, kv_mb, reason)


async def run_bench(
    settings: Any,
    *,
    model: str | None = None,
    reply_tokens: int = 128,
    trials: int = 3,
    progress: bool = True,
) -> BenchReport:
    """Load the engine as `run` would and measure it; see the module docstring."""
    import torch

    engine = make_engine(settings, model=model)
    if not isinstance(engine, LocalEngine):
        raise EngineError(
            "hermes-bot bench measures the local engine (ENGINE=local); with ENGINE=openai, "
            "use your server's own benchmark (e.g. vLLM's benchmarks/benchmark_serving.py)"
        )
    levels_wanted = concurrency_levels(settings.max_batch)
    bars = Progress(total=4 + len(levels_wanted), enabled=progress)
    try:
        with bars.step("loading the model"):
            t0 = time.perf_counter()
            await engine.start()
            load_s = time.perf_counter() - t0
        try:
            return await _measure(
                engine, settings, torch, load_s, levels_wanted, reply_tokens, trials, bars
            )
        finally:
            await engine.close()
    finally:
        bars.close()


async def _measure(
    engine: LocalEngine,
    settings: Any,
    torch: Any,
    load_s: float,
    levels_wanted: list[int],
    reply_tokens: int,
    trials: int,
    bars: Progress,
) -> BenchReport:
    device = engine.info.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    after_load = torch.cuda.memory_allocated() / MIB if cuda else None
    params = params_from_settings(settings, max_new_tokens=reply_tokens, seed=1)
    with bars.step("warm-up"):
        await engine.complete(render_chat(SYSTEM, []), GenerationParams(max_new_tokens=2))
    with bars.step("single stream"):
        single_tps, single_tokens = await single_stream(engine, params)
    levels = []
    for c in levels_wanted:
        with bars.step(f"{c} channel{'s' if c != 1 else ''} at once"):
            levels.append(await aggregate(engine, c, params))
    window = window_of(engine, settings.context_tokens)
    with bars.step("time to first token"):
        first = await first_token(engine, window, trials, cache_on=settings.kv_cache_mb > 0)
    memory = MemorySeen(
        device=device,
        weights_mb=engine.model.get_memory_footprint() / MIB,
        process_peak_mb=peak_rss_mb(),
        ram_available_mb=ram_available_mb(),
    )
    if cuda:
        props = torch.cuda.get_device_properties(torch.device(device))
        memory.gpu_after_load_mb = after_load
        memory.gpu_peak_mb = torch.cuda.max_memory_allocated() / MIB
        memory.gpu_total_mb = props.total_memory / MIB
    assert engine.batcher is not None
    return BenchReport(
        model=engine.model_path,
        device=device,
        dtype=engine.plan.dtype,
        quantization=engine.plan.quantization,
        max_batch=settings.max_batch,
        kv_cache_mb=settings.kv_cache_mb,
        torch_threads=torch.get_num_threads(),
        load_s=load_s,
        memory=memory,
        single_stream_tps=single_tps,
        single_stream_tokens=single_tokens,
        levels=levels,
        first_token=first,
        recommendation=recommend(memory, levels, engine.batcher.bytes_per_token, window),
    )


def main(
    settings: Any,
    *,
    model: str | None,
    as_json: bool,
    tokens: int,
    trials: int,
    servers: list[str] | None = None,
    rounds: int = 3,
) -> int:
    """The `hermes-bot bench` command: prints the table (or JSON); returns the exit status.

    With `--server URL`s, or an engine other than `local` (llamacpp), it prints the engines
    side by side instead (`bot.bench_compare`): the same prompts through each."""
    from bot.engine_choice import choose_engine

    kind = choose_engine(settings, model)[0]
    if kind == "openai":
        print(
            "hermes-bot: hermes-bot bench measures the local engine (ENGINE=local or llamacpp); "
            "to measure a server beside it: hermes-bot bench --server URL",
            file=sys.stderr,
        )
        return 1
    if servers or kind != "local":
        return compare_main(settings, model=model, servers=servers or [], tokens=tokens,
                            rounds=rounds)  # fmt: skip
    try:
        report = asyncio.run(run_bench(settings, model=model, reply_tokens=tokens, trials=trials))
    except EngineError as exc:
        print(f"hermes-bot: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    return 0


def compare_main(
    settings: Any, *, model: str | None, servers: list[str], tokens: int, rounds: int
) -> int:
    """`hermes-bot bench` side by side: MODEL on its engine, then each server, one table."""
    from bot import bench_compare
    from bot.engine.openai import OpenAIEngine

    name = model or settings.model
    engine = make_engine(settings, model=model)
    tokenizer = settings.tokenizer or name
    columns: list[tuple[str, Any]] = [(f"{engine.info.engine} (this bot)", engine)]
    for url in servers:
        server = OpenAIEngine(
            base_url=url, model=settings.openai_model or name, tokenizer=tokenizer
        )
        columns.append((url, server))
    try:
        found = asyncio.run(
            bench_compare.compare(
                columns, stories, tokens=tokens, channels=settings.max_batch, rounds=rounds
            )
        )
    except EngineError as exc:
        print(f"hermes-bot: {exc}", file=sys.stderr)
        return 1
    base = 1 if servers else 0
    print(bench_compare.table(found, tokens=tokens, channels=settings.max_batch, baseline=base))
    return 0
