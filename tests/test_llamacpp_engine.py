"""ENGINE=llamacpp on the real SmolLM2 Q4_1 GGUF: answers, the file's template, stops,
cancellation, and channels batched giving the same greedy text as one at a time.

One engine (two slots) serves the module; a second, one slot, is the one-at-a-time reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from bot.engine import GenerationParams
from bot.engine.llamacpp import LlamaCppEngine
from bot.prompt import format_single
from tests.llamacpp_helpers import chatml, need_llamacpp

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),  # the module's engine lives on one event loop
]

GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."}


Ask = Callable[[str], str]


@pytest.fixture(scope="module")
def ask(smollm2_hf: Path) -> Ask:
    """A one-question prompt in SmolLM2's own chat template."""
    return lambda question: chatml(smollm2_hf, [SYSTEM, {"role": "user", "content": question}])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm2_gguf: Path, smollm2_hf: Path) -> AsyncIterator[LlamaCppEngine]:
    need_llamacpp()
    eng = LlamaCppEngine(
        smollm2_gguf, threads=2, max_batch=2, context_tokens=1024, tokenizer=str(smollm2_hf)
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def test_answers_with_the_files_template(engine: LlamaCppEngine, ask: Ask, smollm2_hf: Path):
    """The file's template, end-of-turn token and an answer; the transformers tokenizer the
    conversation layer reads the format from has the same ids as llama.cpp's."""
    hf_template = (smollm2_hf / "chat_template.jinja").read_text()
    assert engine.chat_template.strip() == hf_template.strip()  # the GGUF's own template
    assert "<|im_end|>" in engine.eog_tokens  # the end-of-turn token stops a reply
    sample = "<|im_start|>user\nhi there, café<|im_end|>"
    assert engine.tokenize(sample, add_special=False) == (
        engine.tokenizer(sample, add_special_tokens=False).input_ids
    )
    gen = engine.generate(ask("What is the capital of France?"), GREEDY)
    text = await gen.text_all()
    assert "Paris" in text
    assert gen.stats.finish_reason == "eos"  # ended at <|im_end|>, not at the length limit
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert gen.stats.prompt_tokens == engine.count_tokens(gen.prompt)


async def test_control_tokens_are_llama_cpp_token_ids(engine: LlamaCppEngine):
    """The template's markers are single control tokens; defused text would hold none."""
    assert engine.control_token_count("<|im_start|>user\nhi<|im_end|>") == 2
    assert engine.control_token_count("just text with <|im_start  |> in it") == 0
    assert "<|im_start|>" in engine.control_tokens


async def test_stop_string_and_length(engine: LlamaCppEngine, ask: Ask):
    prompt = ask("Name three colours.")
    full = await engine.generate(prompt, replace(GREEDY, max_new_tokens=40)).text_all()
    words = full.split()
    assert len(words) > 3, full
    stop = words[len(words) // 2]
    gen = engine.generate(prompt, replace(GREEDY, max_new_tokens=40, stop=(stop,)))
    assert await gen.text_all() == full[: full.find(stop)]
    assert gen.stats.finish_reason == "stop"
    short = engine.generate(prompt, replace(GREEDY, max_new_tokens=3))
    await short.text_all()
    assert short.stats.finish_reason == "length" and short.stats.new_tokens == 3


async def test_cancellation_between_tokens(engine: LlamaCppEngine, ask: Ask):
    long = replace(GREEDY, max_new_tokens=400)
    gen = engine.generate(ask("Write a long story about a dragon."), long)
    async for _ in gen:
        gen.cancel()
        break
    done = engine.generate(ask("What is 2 + 2?"), GREEDY)  # the engine goes on serving
    assert await done.text_all()
    assert gen.stats.finish_reason == "cancelled"
    assert gen.stats.new_tokens < long.max_new_tokens


async def test_two_channels_batched_match_one_at_a_time(
    engine: LlamaCppEngine, ask: Ask, smollm2_gguf: Path, smollm2_hf: Path
):
    prompts = {
        "a": ask("What is the capital of France?"),
        "b": ask("Give me a tip for learning to cook."),
    }
    params = replace(GREEDY, max_new_tokens=32)
    single = LlamaCppEngine(
        smollm2_gguf, threads=2, max_batch=1, context_tokens=1024, tokenizer=str(smollm2_hf)
    )
    await single.start()
    try:
        alone = {k: await single.generate(p, params).text_all() for k, p in prompts.items()}
    finally:
        await single.close()
    gens = {k: engine.generate(p, params, cache_key=k) for k, p in prompts.items()}
    together = dict(
        zip(gens, await asyncio.gather(*(g.text_all() for g in gens.values())), strict=True)
    )
    assert together == alone
    assert engine.batcher.peak_active == 2  # they really shared decode steps


async def test_a_channels_next_message_reuses_its_slot(
    engine: LlamaCppEngine, ask: Ask, smollm2_gguf: Path, smollm2_hf: Path
):
    first = ask("What is the capital of France?")
    reply = await engine.generate(first, GREEDY, cache_key="reuse").text_all()
    other = await engine.generate(ask("Say hi."), GREEDY, cache_key="other").text_all()
    assert other
    follow = chatml(smollm2_hf, [
        SYSTEM,
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And of Italy?"},
    ])  # fmt: skip
    gen = engine.generate(follow, GREEDY, cache_key="reuse")
    text = await gen.text_all()
    assert gen.stats.reused_tokens >= engine.count_tokens(first) - 1
    fresh = LlamaCppEngine(
        smollm2_gguf, threads=2, max_batch=1, context_tokens=1024, tokenizer=str(smollm2_hf)
    )
    await fresh.start()
    try:
        assert await fresh.generate(follow, GREEDY).text_all() == text
    finally:
        await fresh.close()


async def test_alpaca_prompt_and_stops_on_the_same_engine(engine: LlamaCppEngine):
    """Any prompt text works: the format is the conversation layer's choice."""
    gen = engine.generate(format_single("Say hello."), replace(GREEDY, stop=("### Instruction",)))
    assert (await gen.text_all()).strip()


async def test_a_missing_file_is_one_line(tmp_path: Path):
    need_llamacpp()
    eng = LlamaCppEngine(tmp_path / "nope.gguf")
    from bot.engine import EngineError

    with pytest.raises(EngineError, match="model file not found"):
        await eng.start()


async def test_sampling_with_penalty_is_seeded(engine: LlamaCppEngine, ask: Ask):
    """Temperature, top-k/top-p and the repetition penalty run in llama.cpp's sampler chain; the
    same seed gives the same reply."""
    params = GenerationParams(
        max_new_tokens=16, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7
    )
    prompt = ask("Tell me about cats.")
    first = await engine.generate(prompt, params).text_all()
    again = await engine.generate(prompt, params).text_all()
    assert first and first == again


async def test_a_new_channel_copies_a_shared_prefix_from_another_slot(
    engine: LlamaCppEngine, smollm2_gguf: Path, smollm2_hf: Path
):
    """Two new channels asking at once with the same long system prompt (a persona card): the
    second takes the first's cached prefix instead of computing it, and answers as it would
    alone."""
    card = {
        "role": "system",
        "content": "You are Captain Moss, a retired lighthouse keeper from Cornwall who speaks "
        "in short sentences, loves storms, keeps a logbook of every ship that passes, and "
        "answers every question with a fact about the sea.",
    }
    prompts = [
        chatml(smollm2_hf, [card, {"role": "user", "content": question}])
        for question in ("What do you do all day?", "What is your favourite weather?")
    ]
    ids = [engine.tokenize(p, add_special=False) for p in prompts]
    shared = next(i for i, (x, y) in enumerate(zip(*ids, strict=False)) if x != y)
    params = replace(GREEDY, max_new_tokens=16)
    single = LlamaCppEngine(
        smollm2_gguf, threads=2, max_batch=1, context_tokens=1024, tokenizer=str(smollm2_hf)
    )
    await single.start()
    try:
        alone = [await single.generate(p, params).text_all() for p in prompts]
    finally:
        await single.close()
    gens = [engine.generate(p, params, cache_key=f"moss-{i}") for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(g.text_all() for g in gens))
    assert together == alone
    assert gens[1].stats.reused_tokens == shared  # the card came from the first slot's cache
    assert gens[0].stats.reused_tokens < shared  # the first computed it
