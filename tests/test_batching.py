"""Continuous batching and per-channel prompt caching in the local engine (tiny Llama, CPU).

Equality is exact, token for token: greedy decoding in float32, batched against one-at-a-time
(the same engine with MAX_BATCH=1), and against a plain `model.generate`.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bot.engine import GenerationParams, LocalEngine, ReplyStats, load_tokenizer
from bot.engine.batching import Batcher
from bot.engine.decode import IncrementalDecoder
from bot.engine.kv_cache import CachedPrefix, PrefixCache, common_prefix, kv_bytes_per_token
from bot.engine.request import EngineRequest
from bot.prompt import RESPONSE, Turn, format_single, render_chat
from bot.prompt_window import TokenCounter, fit_prompt

GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
#: Greedy with the bot's default repetition penalty: exercises per-row histories in a batch.
PENALISED = replace(GREEDY, repetition_penalty=1.1)

PROMPTS = [
    format_single(text)
    for text in (
        "hello there, how are you?",
        "Alice: what is the weather like?",
        "print('hi') in python please",
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Discord bots answer questions about code",
        "0123456789 !?.,:;",
        "music, games and the weather " * 6,
        "Bob: hi",
    )
]


async def make_engine(folder: Path, **kw) -> LocalEngine:
    eng = LocalEngine(folder, dtype="float32", device_map="none", **kw)
    await eng.start()
    return eng


class MostAtOnce:
    """The most requests the engine ran at once, seen by one of its finish hooks.

    The hook runs on the worker thread as each reply ends, after that reply left the running
    set and before any other leaves it: the running set then holds every request that ran
    alongside it. (Not for requests cancelled while queued: those never ran.)
    """

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.most = 0
        engine.finish_hooks.append(self)

    def __call__(self, stats: ReplyStats) -> None:
        assert self.engine.batcher is not None
        self.most = max(self.most, self.engine.batcher.active + 1)


def kv_cache_mb(folder: Path, tokens: float) -> float:
    """KV_CACHE_MB that holds `tokens` tokens of the float32 model in `folder`."""
    from transformers import AutoConfig

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(folder), torch.float32)
    return per_token * tokens / 2**20


def prompt_tokens(folder: Path, prompt: str) -> int:
    return len(load_tokenizer(str(folder))(prompt).input_ids)


@pytest.fixture
async def engines(tiny_model: Path) -> AsyncIterator[tuple[LocalEngine, LocalEngine]]:
    """(batched engine with MAX_BATCH=8 and a prefix cache, one-at-a-time engine)."""
    batched = await make_engine(tiny_model, max_batch=8, kv_cache_mb=64)
    single = await make_engine(tiny_model, max_batch=1, kv_cache_mb=0)
    try:
        yield batched, single
    finally:
        await batched.close()
        await single.close()


def token_ids(engine: LocalEngine, text: str) -> list[int]:
    return engine.tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("params", [GREEDY, PENALISED], ids=["greedy", "penalised"])
async def test_batched_equals_one_at_a_time(engines, params: GenerationParams):
    batched, single = engines
    # different lengths, so rows join and leave the batch at different steps
    plist = [replace(params, max_new_tokens=8 + 4 * i) for i in range(len(PROMPTS))]
    batched_most, single_most = MostAtOnce(batched), MostAtOnce(single)
    expected = []
    for prompt, p in zip(PROMPTS, plist, strict=True):
        gen = single.generate(prompt, p)
        expected.append((await gen.text_all(), gen.stats.new_tokens, gen.stats.finish_reason))
    gens = [batched.generate(prompt, p) for prompt, p in zip(PROMPTS, plist, strict=True)]
    texts = await asyncio.gather(*(g.text_all() for g in gens))
    got = [(t, g.stats.new_tokens, g.stats.finish_reason) for t, g in zip(texts, gens, strict=True)]
    assert got == expected
    assert batched_most.most > 1  # they really ran together
    assert single_most.most == 1
    assert any(text for text, _, _ in got)


CHUNK = 16  # prefill tokens per step in the chunked tests


async def test_chunked_prefill_equals_whole_prefill(engines, tiny_model: Path):
    """Prompts longer than the prefill budget are computed in pieces between decode steps."""
    _, single = engines
    chunked = await make_engine(tiny_model, max_batch=8, kv_cache_mb=64, prefill_chunk=CHUNK)
    try:
        long_prompts = [
            format_single(f"{i}: " + "music, games and the weather " * 12) for i in range(4)
        ]
        expected = [await single.complete(p, GREEDY) for p in long_prompts]
        gens = [chunked.generate(p, GREEDY, cache_key=str(i)) for i, p in enumerate(long_prompts)]
        assert await asyncio.gather(*(g.text_all() for g in gens)) == expected
        assert all(g.stats.prompt_tokens > 64 for g in gens)

        # while a long new prompt is computed chunk by chunk, a running reply goes on decoding
        running = chunked.generate(PROMPTS[0], replace(GREEDY, max_new_tokens=1000))
        stream = aiter(running)  # kept: a dropped iterator would cancel the request
        await anext(stream)  # it decodes now
        newcomer: list[int] = []

        def on_finish(stats: ReplyStats) -> None:  # worker thread: the running reply's count
            newcomer.append(running.stats.new_tokens)

        chunked.finish_hooks.append(on_finish)
        long_prompt = format_single("music, games and the weather " * 40)
        before = running.stats.new_tokens
        # one reply token: the newcomer ends (and the hook reads) right after its last chunk
        await chunked.generate(long_prompt, replace(GREEDY, max_new_tokens=1)).text_all()
        chunks = -(-prompt_tokens(tiny_model, long_prompt) // CHUNK)
        assert chunks >= 10
        assert running.stats.finish_reason == ""  # still running when the newcomer ended
        # one decode step of the running reply after each chunk but the newcomer's last
        assert newcomer[0] - before >= chunks - 1
        running.cancel()
        await stream.aclose()
    finally:
        await chunked.close()


async def test_a_burst_of_cold_prompts_is_prefilled_in_one_forward(engines):
    """With nothing decoding, new prompts that start cold are computed together (one padded
    forward, as a static batch's prefill), and every reply is what it is alone. The batcher
    runs on a thread with every request queued before it starts, so they arrive together."""
    eng, _ = engines
    # lengths a few tokens apart: the shorter rows are padded
    prompts = [format_single(f"question {i}: the weather in town {'ab ' * i}?") for i in range(5)]
    params = [GREEDY, PENALISED, GREEDY, replace(GREEDY, max_new_tokens=3), PENALISED]
    shapes: list[tuple[int, ...]] = []
    hook = eng.model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )

    async def served(batch: list[tuple[str, GenerationParams]], max_batch: int) -> list[str]:
        todo: queue.Queue[EngineRequest | None] = queue.Queue()
        reqs = [EngineRequest(p, q) for p, q in batch]
        for r in [*reqs, None]:
            todo.put(r)
        await asyncio.to_thread(Batcher(eng.model, eng.tokenizer, max_batch=max_batch).serve, todo)
        return [await r.text_all() for r in reqs]

    try:
        together = await served(list(zip(prompts, params, strict=True)), max_batch=8)
        first = shapes[0]
        alone = [
            (await served([pair], max_batch=1))[0] for pair in zip(prompts, params, strict=True)
        ]
    finally:
        hook.remove()
    assert first[0] == len(prompts) and first[1] > 1  # the first forward: all five prompts
    assert together == alone


async def test_batched_tokens_equal_model_generate(engines):
    batched, _ = engines
    gens = [batched.generate(prompt, GREEDY) for prompt in PROMPTS]
    await asyncio.gather(*(g.text_all() for g in gens))
    # the model as transformers builds it: the engine's own object is fused for the CPU
    # (`bot/engine/cpu_weights.py`), so this also checks those layers against transformers'
    tok, model = batched.tokenizer, AutoModelForCausalLM.from_pretrained(batched.model_path)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GREEDY.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        new = out[0, ids.shape[1] :].tolist()
        n = gen.stats.new_tokens
        assert gen.text == tok.decode(new[:n], skip_special_tokens=True).rstrip("\ufffd")


async def test_cancelling_one_leaves_the_others_intact(engines):
    batched, single = engines
    long = replace(GREEDY, max_new_tokens=200)
    expected = [await single.complete(p, GREEDY) for p in PROMPTS[:4]]
    victim = batched.generate(PROMPTS[4], long)
    gens = [batched.generate(p, GREEDY) for p in PROMPTS[:4]]
    queued_victim = batched.generate(PROMPTS[5], long)
    queued_victim.cancel()

    async def cancel_after_first_piece() -> None:
        async for _ in victim:
            victim.cancel()

    _, *texts = await asyncio.gather(cancel_after_first_piece(), *(g.text_all() for g in gens))
    assert texts == expected
    assert victim.stats.finish_reason == "cancelled"
    assert victim.stats.new_tokens < 200
    assert queued_victim.stats.finish_reason == "cancelled"
    assert await queued_victim.text_all() == ""
    # the engine goes on serving
    assert await batched.complete(PROMPTS[0], GREEDY) == expected[0]


async def test_cap_on_concurrent_sequences(tiny_model: Path):
    eng = await make_engine(tiny_model, max_batch=2, kv_cache_mb=0)
    try:
        seen = MostAtOnce(eng)
        gens = [eng.generate(p, GREEDY) for p in PROMPTS]
        await asyncio.gather(*(g.text_all() for g in gens))
        assert seen.most == 2
        assert all(g.stats.finish_reason in ("eos", "length") for g in gens)
    finally:
        await eng.close()


async def test_kv_memory_cap_makes_requests_wait(tiny_model: Path):
    tokens = prompt_tokens(tiny_model, PROMPTS[0]) + GREEDY.max_new_tokens
    # room for two such requests, not three
    eng = await make_engine(
        tiny_model, max_batch=8, kv_cache_mb=kv_cache_mb(tiny_model, tokens * 2.5)
    )
    try:
        seen = MostAtOnce(eng)
        gens = [eng.generate(PROMPTS[0], GREEDY) for _ in range(5)]
        texts = await asyncio.gather(*(g.text_all() for g in gens))
        assert seen.most == 2
        assert len(set(texts)) == 1
    finally:
        await eng.close()


# ---- prefix reuse ------------------------------------------------------------------------


def next_turn(prompt: str, reply: str, message: str) -> str:
    """The prompt of the channel's next message: the last one grows only at its end."""
    return f"{prompt}{reply}\n\n### Instruction:\nAlice: {message}\n\n{RESPONSE}"


async def test_prefix_reuse_equals_cold_prompt(engines):
    batched, single = engines
    first = PROMPTS[1]
    gen1 = batched.generate(first, GREEDY, cache_key="chan-1")
    reply = await gen1.text_all()
    assert gen1.stats.reused_tokens == 0
    second = next_turn(first, reply, "and tomorrow?")
    gen2 = batched.generate(second, GREEDY, cache_key="chan-1")
    warm = await gen2.text_all()
    assert gen2.stats.reused_tokens > 0
    assert gen2.stats.reused_tokens >= len(batched.tokenizer(first).input_ids) - 2
    assert gen2.stats.prompt_tokens == len(batched.tokenizer(second).input_ids)
    cold = await single.complete(second, GREEDY)
    assert warm == cold
    # another channel's cache is never used for this one
    gen3 = batched.generate(second, GREEDY, cache_key="chan-2")
    assert await gen3.text_all() == cold
    assert gen3.stats.reused_tokens == 0
    # a third turn reuses the second's prompt and reply, while other channels batch alongside
    third = next_turn(second, warm, "thanks!")
    others = [batched.generate(p, GREEDY, cache_key=f"o{i}") for i, p in enumerate(PROMPTS[2:6])]
    gen4 = batched.generate(third, GREEDY, cache_key="chan-1")
    results = await asyncio.gather(gen4.text_all(), *(g.text_all() for g in others))
    assert gen4.stats.reused_tokens >= gen2.stats.prompt_tokens - 2
    assert results[0] == await single.complete(third, GREEDY)
    assert results[1:] == [await single.complete(p, GREEDY) for p in PROMPTS[2:6]]


async def test_prefix_cache_is_bounded_lru(tiny_model: Path):
    longest = max(prompt_tokens(tiny_model, p) for p in PROMPTS[:3])
    budget = kv_cache_mb(tiny_model, (longest + GREEDY.max_new_tokens) * 2)
    eng = await make_engine(tiny_model, max_batch=4, kv_cache_mb=budget)
    try:
        for i, prompt in enumerate(PROMPTS[:3]):
            await eng.generate(prompt, GREEDY, cache_key=f"c{i}").text_all()
        cache = eng.batcher.prefixes
        assert cache.nbytes <= eng.batcher.kv_bytes
        assert 1 <= len(cache) < 3
        assert cache.take("c2") is not None  # the newest survives, the oldest went first
        assert cache.take("c0") is None
    finally:
        await eng.close()


def test_prefix_cache_lru_order():
    cache = PrefixCache()
    t = torch.zeros(1, 1, 4, 2)
    for key in "abc":
        cache.put(key, CachedPrefix([1, 2, 3, 4], [(t, t)], 64))
    assert cache.nbytes == 192
    assert cache.take("a") is not None
    cache.put("a", CachedPrefix([1], [(t, t)], 64))  # "a" is now the most recent
    cache.shrink(128)
    assert cache.take("b") is None and cache.take("c") is not None and cache.take("a") is not None
    assert cache.nbytes == 0
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0


async def test_incremental_decoder_matches_full_decode(engines):
    batched, _ = engines
    tok = batched.tokenizer
    ids = tok("Alice: héllo wörld ✓ — ok 🎉 done", add_special_tokens=False).input_ids
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in ids)
    assert text == tok.decode(ids, skip_special_tokens=True)


# ---- cache-friendly fitting --------------------------------------------------------------


def test_fitting_changes_the_prefix_only_at_slice_boundaries(engines):
    batched, _ = engines
    count = TokenCounter(batched.count_tokens)
    system = "You are Hermes, a helpful assistant."
    budget, slack = 1200, 0.25
    stored: list[Turn] = []
    hint: int | None = None
    last_text = ""
    changes: list[int] = []
    for n in range(120):
        role = "user" if n % 2 == 0 else "assistant"
        content = f"message number {n}: the quick brown fox jumps over the lazy dog"
        stored.append(Turn(role, content, "Alice" if role == "user" else "", id=n))
        history = list(reversed(stored[:-1]))  # newest first, as memory reads it
        fitted = fit_prompt(
            system, history, stored[-1], count, budget, start_hint=hint, slack=slack
        )
        kept = [t.id for t in fitted.turns]
        # newest-first guarantee: the kept turns are exactly the newest ones, none skipped
        assert kept == list(range(kept[0], n + 1))
        assert fitted.turns[-1] is stored[-1]
        assert count(fitted.text) <= budget
        if hint is None or fitted.start_id == hint:
            # the prompt grew only at its end: the last one (less its open Response) is a prefix
            assert fitted.text.startswith(last_text[: -len(RESPONSE)])
        else:
            changes.append(n)
            assert fitted.start_id > hint
            assert fitted.tokens <= budget * (1 - slack) + count.block(stored[-1])
        hint = fitted.start_id
        last_text = fitted.text
    cost = max(count.block(t) for t in stored)
    gap = int(slack * budget / cost) - 1  # messages a quarter of the window holds, less one
    assert len(changes) >= 2
    assert all(b - a >= gap for a, b in zip(changes, changes[1:], strict=False)), changes
    assert render_chat(system, fitted.turns) == fitted.text


# ---- metrics -------------------------------------------------------------------------------


async def test_metrics_endpoint_reports_replies(engines, settings_factory):
    import socket
    import urllib.request

    from bot import metrics

    batched, _ = engines
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = metrics.setup(settings_factory(METRICS_PORT=port), lambda: batched)
    assert exporter is not None
    try:
        first = batched.generate(PROMPTS[1], GREEDY, cache_key="m")
        reply = await first.text_all()
        second = batched.generate(next_turn(PROMPTS[1], reply, "more"), GREEDY, cache_key="m")
        await second.text_all()
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert "hermes_time_to_first_token_seconds_count 2.0" in text
        assert "hermes_queue_wait_seconds_count 2.0" in text
        assert f"hermes_reused_prompt_tokens_total {float(second.stats.reused_tokens)}" in text
        assert "hermes_engine_queue_length 0.0" in text
        summary = metrics.summary([first.stats, second.stats])
        assert "last 2 replies" in summary and "from cache" in summary
    finally:
        exporter.stop()
    assert metrics.setup(settings_factory(METRICS_PORT=0)) is None
    assert metrics.summary([]) == "no replies yet"
