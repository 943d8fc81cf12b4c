"""The local engine on a tiny real Llama: streaming, greedy equality, stops, cancel, load errors."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bot.engine import (
    EngineError,
    EngineRequest,
    GenerationParams,
    LocalEngine,
    ReplyStats,
    RequestState,
    StopScanner,
    plan_load,
)
from bot.prompt import format_single
from tests.fake_discord.common import PATIENCE

PROMPT = format_single("hello there, how are you?")
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)


@pytest.fixture
async def engine(tiny_model: Path):
    eng = LocalEngine(tiny_model, dtype="float32", device_map="none")
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def collect(gen: EngineRequest) -> list[str]:
    return [piece async for piece in gen]


def reference(engine: LocalEngine, prompt: str, new_tokens: int) -> tuple[str, list[int]]:
    """A direct greedy `model.generate` of the same prompt: (text, new token ids)."""
    tok, model = engine.tokenizer, engine.model
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


async def test_streaming_equals_greedy_generate(engine: LocalEngine):
    gen = engine.generate(PROMPT, GREEDY)
    pieces = await collect(gen)
    assert len(pieces) >= 3
    assert all(pieces)
    assert "".join(pieces) == gen.text
    stats = gen.stats
    assert stats.finish_reason in ("length", "eos") and gen.state is RequestState.FINISHED
    assert stats.prompt_tokens == len(engine.tokenizer(PROMPT).input_ids)
    assert 0 < stats.new_tokens <= GREEDY.max_new_tokens
    assert stats.first_token_at is not None and stats.finished_at is not None
    expected, _ = reference(
        engine, PROMPT, stats.new_tokens + (1 if stats.finish_reason == "eos" else 0)
    )
    # The engine holds back an incomplete UTF-8 character until its last byte arrives, so a
    # reply cut by the token limit mid-character ends without the replacement char.
    assert gen.text == expected.rstrip("\ufffd")
    assert gen.text  # the comparison above is not vacuous


async def test_a_second_start_keeps_the_loaded_model(engine: LocalEngine):
    """The bot starts the engine it is handed; one started already is not loaded twice."""
    model, batcher = engine.model, engine.batcher
    await engine.start()
    assert engine.model is model and engine.batcher is batcher
    assert await engine.generate(PROMPT, GREEDY).text_all() == reference(engine, PROMPT, 24)[0]


async def test_same_prompt_same_reply(engine: LocalEngine):
    first = await engine.generate(PROMPT, GREEDY).text_all()
    second = await engine.complete(PROMPT, GREEDY)
    assert first == second != ""


def pick_stop(text: str) -> tuple[str, int]:
    """A short printable substring from the middle of `text`, and where it first occurs."""
    for start in range(len(text) // 2, len(text) - 3):
        stop = text[start : start + 3]
        if stop.isprintable() and "\ufffd" not in stop and text.find(stop) > 0:
            return stop, text.find(stop)
    pytest.skip("the tiny model's output has no printable 3-character run")


async def test_stop_string_ends_the_reply(engine: LocalEngine):
    params = GenerationParams(max_new_tokens=40, temperature=0.0, repetition_penalty=1.0)
    full = await engine.complete(PROMPT, params)
    stop, at = pick_stop(full)
    gen = engine.generate(PROMPT, replace(params, stop=(stop,)))
    pieces = await collect(gen)
    assert gen.text == full[:at]
    assert "".join(pieces) == gen.text
    assert stop not in gen.text
    assert gen.stats.finish_reason == "stop"
    assert gen.stats.new_tokens < 40  # generation stopped, it did not just trim


async def test_max_new_tokens_is_respected(engine: LocalEngine):
    for n in (1, 5):
        gen = engine.generate(PROMPT, GenerationParams(max_new_tokens=n, temperature=0.0))
        await gen.text_all()
        assert gen.stats.new_tokens <= n
        if gen.stats.finish_reason == "length":
            assert gen.stats.new_tokens == n
        expected, _ = reference(engine, PROMPT, n)
        assert gen.text == expected.rstrip("\ufffd")  # exactly the first n greedy tokens


async def test_cancel_mid_stream_then_serve_the_next(engine: LocalEngine):
    long = GenerationParams(max_new_tokens=1000, temperature=0.0, repetition_penalty=1.0)
    gen = engine.generate(PROMPT, long)
    pieces = []
    async for piece in gen:
        pieces.append(piece)
        if len(pieces) == 1:
            gen.cancel()
    assert gen.stats.finish_reason == "cancelled" and gen.state is RequestState.CANCELLED
    assert gen.stats.new_tokens < 1000
    assert "".join(pieces) == gen.text
    # the worker lives on and serves the next request normally
    after = engine.generate(PROMPT, GREEDY)
    text = await after.text_all()
    assert after.stats.finish_reason in ("length", "eos")
    assert text == await engine.complete(PROMPT, GREEDY)


async def test_leaving_the_loop_cancels(engine: LocalEngine):
    loop = asyncio.get_running_loop()
    ended: asyncio.Queue[ReplyStats] = asyncio.Queue()  # the engine's finished replies, in order

    def on_finish(stats: ReplyStats) -> None:  # on the worker thread
        loop.call_soon_threadsafe(ended.put_nowait, stats)

    engine.finish_hooks.append(on_finish)
    try:
        gen = engine.generate(PROMPT, GenerationParams(max_new_tokens=1000, temperature=0.0))
        async for _ in gen:
            break
        # the abandoned iterator is closed by the loop; the worker notices and ends the request
        assert await asyncio.wait_for(ended.get(), PATIENCE) is gen.stats
    finally:
        engine.finish_hooks.remove(on_finish)
    assert gen.stats.finish_reason == "cancelled" and gen.state is RequestState.CANCELLED
    assert gen.stats.new_tokens < 1000
    assert await engine.complete(PROMPT, GenerationParams(max_new_tokens=3, temperature=0.0))


async def test_cancel_before_start(engine: LocalEngine):
    blocker = engine.generate(PROMPT, GenerationParams(max_new_tokens=50, temperature=0.0))
    queued = engine.generate(PROMPT, GREEDY)
    queued.cancel()
    assert await queued.text_all() == ""
    assert queued.stats.finish_reason == "cancelled" and queued.state is RequestState.CANCELLED
    await blocker.text_all()
    assert blocker.stats.finish_reason in ("length", "eos")
    assert blocker.state is RequestState.FINISHED


async def test_eos_ends_the_reply(engine: LocalEngine):
    _, tokens = reference(engine, PROMPT, 10)
    k = next((i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 2), None)
    if k is None:
        pytest.skip("no fresh token to turn into EOS")
    engine.model.generation_config.eos_token_id = tokens[k]
    gen = engine.generate(PROMPT, GREEDY)
    await gen.text_all()
    assert gen.stats.finish_reason == "eos"
    assert gen.stats.new_tokens == k


async def test_sampling_with_a_seed_is_reproducible(engine: LocalEngine):
    params = GenerationParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    assert await engine.complete(PROMPT, params) == await engine.complete(PROMPT, params)


async def test_count_tokens(engine: LocalEngine):
    assert engine.count_tokens("") == 0
    n = engine.count_tokens("hello there")
    assert n == len(engine.tokenizer("hello there").input_ids) - 1  # no BOS


async def test_generate_before_start_is_an_engine_error(tiny_model: Path):
    eng = LocalEngine(tiny_model, dtype="float32", device_map="none")
    with pytest.raises(EngineError, match="not started"):
        eng.generate(PROMPT, GREEDY)


# ---- loading ---------------------------------------------------------------------------------


def test_quantization_asks_bitsandbytes_not_cuda():
    """QUANTIZATION works wherever bitsandbytes has a backend (the CPU too); without it, or
    where it has none, one line says what is needed (tests/test_quantized.py has the rest)."""
    for q in ("4bit", "8bit"):
        if importlib.util.find_spec("bitsandbytes") is None:
            with pytest.raises(EngineError, match=r"pip install 'hermes-discord\[quant\]'"):
                plan_load(quantization=q, cuda=False)
            continue
        plan = plan_load(dtype="float32", quantization=q, cuda=False)
        assert plan.device_map == "cpu" and "quantization_config" in plan.kwargs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "3bit", "cuda": True}, "QUANTIZATION='3bit' is not valid"),
        ({"dtype": "fp8", "cuda": False}, "DTYPE='fp8' is not valid"),
        ({"device_map": "cuda:0", "cuda": False}, "CUDA is not available"),
    ],
)
def test_bad_load_settings(kwargs, match):
    with pytest.raises(EngineError, match=match):
        plan_load(**kwargs)


def test_dtype_auto_plan_on_cpu():
    """DTYPE=auto on the CPU: no device map, no quantization; the dtype is the hardware rule's
    (tests/test_dtype_auto.py)."""
    plan = plan_load("auto", "auto", cuda=False)
    assert plan.dtype in ("float32", "bfloat16")
    assert plan.kwargs["dtype"] is getattr(torch, plan.dtype)
    assert plan.device_map is None and "device_map" not in plan.kwargs
    assert "quantization_config" not in plan.kwargs
    assert plan_load("float16", "none", cuda=False).kwargs["dtype"] is torch.float16
    assert plan_load("auto", "cuda", cuda=True).device_map == "cuda"


async def test_missing_model_folder_is_an_engine_error(tmp_path: Path):
    eng = LocalEngine(tmp_path / "no-such-model", dtype="float32", device_map="none")
    with pytest.raises(EngineError, match="no-such-model"):
        await eng.start()


async def test_folder_without_weights_is_an_engine_error(tiny_model: Path, tmp_path: Path):
    folder = tmp_path / "tokenizer-only"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, folder / name)
    eng = LocalEngine(folder, dtype="float32", device_map="none")
    with pytest.raises(EngineError, match="cannot load the model"):
        await eng.start()


# ---- stop scanning -------------------------------------------------------------------------


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool, list[str]]:
    scanner = StopScanner(stops)
    out = [scanner.feed(p) for p in pieces]
    out.append(scanner.flush())
    return "".join(out), scanner.stopped, out


def test_stop_split_across_pieces_is_held_back():
    scanner = StopScanner(("\n###", "\nAlice:"))
    assert scanner.feed("Hello") == "Hello"
    assert scanner.feed(" there\n") == " there"  # "\n" could start either stop
    assert scanner.feed("##") == ""  # "\n##" could still become "\n###"
    assert scanner.feed("# Instruction:") == ""
    assert scanner.stopped
    assert scanner.flush() == ""
    assert scanner.feed("more") == ""  # nothing after a stop


def test_held_text_is_released_when_it_is_not_a_stop():
    scanner = StopScanner(("\n###", "\nAlice:"))
    assert scanner.feed("a\nAl") == "a"
    assert scanner.feed("ex: hi") == "\nAlex: hi"
    assert not scanner.stopped
    assert scanner.feed("\n#") == ""
    assert scanner.flush() == "\n#"  # the end of the reply releases the rest


def test_stop_inside_one_piece_and_at_the_start():
    assert feed_all(("STOP",), ["abcSTOPdef"])[:2] == ("abc", True)
    assert feed_all(("STOP",), ["STOP"])[:2] == ("", True)
    assert feed_all((), ["a", "b"])[:2] == ("ab", False)
    assert feed_all(("", "x"), ["abc"])[:2] == ("abc", False)  # empty stops are ignored


def test_random_splits_release_exactly_the_text_before_the_first_stop():
    rnd = random.Random(0)
    stops = ("\n### Instruction:", "\nBob:", "</s>")
    for _ in range(300):
        body = "".join(
            rnd.choice(["a", "b", "\n", "#", "##", "Bo", "b:", " ", "</", "s>"]) for _ in range(40)
        )
        text = body + rnd.choice(["", "\nBob: hi", "\n### Instruction:\nx", "</s>tail"])
        cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
        released, stopped, _ = feed_all(stops, pieces)
        assert released == text[:first]
        assert stopped == (first < len(text))


async def test_generation_reports_stop():
    gen = EngineRequest("prompt", GenerationParams(stop=("STOP",)), None)
    assert gen.emit("hel")
    assert gen.emit("lo ST")
    assert not gen.emit("OP and more")
    gen.finish("length")
    assert await gen.text_all() == "hello "
    assert gen.stats.finish_reason == "stop"


async def test_generation_passes_errors_to_the_reader():
    gen = EngineRequest("prompt", GenerationParams(), None)
    gen.emit("partial")
    gen.finish("error", EngineError("boom"))
    with pytest.raises(EngineError, match="boom"):
        await gen.text_all()
    assert gen.text == "partial" and gen.stats.finish_reason == "error"


async def test_finish_hooks_belong_to_the_engine_and_follow_a_reload(
    engine: LocalEngine, tiny_model: Path, memory, settings_factory
):
    from bot.conversation import Conversations

    other = LocalEngine(tiny_model, dtype="float32", device_map="none")  # never started
    seen = []
    engine.finish_hooks.append(seen.append)
    assert other.finish_hooks == []  # no module-wide list: each engine has its own
    gen = engine.generate(PROMPT, replace(GREEDY, max_new_tokens=3))
    await gen.text_all()
    assert seen == [gen.stats] and gen.stats.finish_reason in ("length", "eos")

    conv = Conversations(settings_factory(), memory, engine)
    conv.set_engine(other)  # /admin model reload swaps engines this way
    assert other.finish_hooks == [seen.append]
    conv.set_engine(other)  # swapping to the same engine does not register twice
    assert other.finish_hooks == [seen.append]
