"""Serving benchmarks, each a ratio measured in one process on the same machine.

- P1: aggregate generated tokens/s for 8 channels talking at once: the local engine batching
  them (MAX_BATCH=8) against one at a time (MAX_BATCH=1). Targets: >= 3x CPU, >= 6x GPU.
  Beside it, the peer a user already has: HF `model.generate` with a static batch of the same
  8 prompts and the same sampling ("ours / HF generate").
- P4: a server under load: requests arriving every `--gap` seconds with replies of 16-256
  tokens. The engine against a static-batching server built on HF `generate` that takes
  whatever has arrived (up to 8) and runs it to the end: throughput and mean latency.
- P2: time to first token for a new message in a channel with ~3,500 tokens of history, with the
  channel's cached prefix against a cold prompt. Target <= 0.2x.
- P5: P2 through the bot's own path (memory, `Conversations.prepare`) in a channel twice the
  window long, with long-term recall off and on: the recall block sits after the current
  message, so the cached prefix still covers the history (`--only 5`).
- S: single-stream tokens/s, one request alone, the engine against HF `generate` on the same
  model and prompt (`--only s`); with `--greedy` both decode greedily and the bench says whether
  they wrote the same text (P1's HF comparison too). Then the memory bandwidth measured in the
  process beside each column's bytes/s (weight bytes per token x tokens/s, `bench/limits.py`):
  the distance to the physical limit. With `--model`, also HF `generate` in the dtype DTYPE=auto
  picks here (`--hf-dtype` to name one) and greedy agreement bf16 vs fp32 on four chat prompts
  (`bench/agreement.py`, `--agree-tokens`).
- P3: the bot's own work between a message event and the engine submit (store the turn, read
  memory, fit the prompt) in a channel with 2,000 stored turns, with the real Llama 2 tokenizer.
  Target p50 <= 5 ms.
- Q: QUANTIZATION none / 8bit / 4bit (bitsandbytes; the CPU too) on the same model in one run:
  load time, footprint, one-stream and 8-channel tokens/s, as ratios against none (`--only q`,
  `--quant`; the same table as `hermes-bot bench --quant none,8bit,4bit`).
- P6 (`--only 6`, with `--model FILE.gguf`): ENGINE=llamacpp batched (MAX_BATCH=channels) and
  one request at a time beside each `--server URL` (any OpenAI-compatible server: llama.cpp's
  `llama-server`, `python -m llama_cpp.server`, vLLM, Ollama), same prompts, greedy, fixed
  lengths (`bot/bench_compare.py`). Targets against llama-server (`--parallel 8`, 2 threads):
  single-stream decode >= 0.9x, 8-channel aggregate >= 1.0x, mean TTFT <= 1.0x. Start the
  server fresh for each run: it keeps every slot's last prompt, and this bench asks the same
  conversations each time it runs (each round its own, so no round answers from a cache).

    python bench/engine.py --only 6 --model SmolLM2-135M-Instruct.Q4_1.gguf --llama-threads 2 \
        --tokenizer ~/.cache/hermes-discord/smollm2/hf --server http://127.0.0.1:8080/v1

    python bench/engine.py                      # CPU, a small random Llama (hidden 256, 4 layers)
    python bench/engine.py --model /models/Nous-Hermes-llama-2-7b --device cuda   # GPU, 7B
    python bench/engine.py --model ~/.cache/hermes-discord/smollm2/hf --greedy --only s12
        # a real model on the CPU: SmolLM2-135M-Instruct (python -m tests.real_model fetches it)

Nothing is downloaded: the small model is built on the spot (tests/tiny.py).

Threads: the engine's worker thread and the thread that runs HF `generate` each get their own
OpenMP pool, and two pools spinning on a small CPU distort every figure. So on the CPU the bench
sets `torch.set_num_threads(1)` for the whole process by default (`--threads N` to change it;
the header line states the count); the engine is idle while HF generates, and the reverse.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.benchmark import SYSTEM, chatter, history, next_message, stories  # noqa: E402
from bot.engine import (  # noqa: E402
    Engine,
    EngineInfo,
    GenerationParams,
    LocalEngine,
    eos_ids,
)
from bot.gguf import is_gguf  # noqa: E402
from bot.prompt import render_chat  # noqa: E402

LLAMA_TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu":
        return {"dtype": "float32", "device_map": "none"}
    return {"dtype": "auto", "device_map": args.device}


async def started(model: Path, args: argparse.Namespace, **kw: Any) -> LocalEngine:
    eng = LocalEngine(model, **engine_kwargs(args), **kw)
    await eng.start()
    await eng.complete(
        "### Instruction:\nhi\n\n### Response:\n", GenerationParams(max_new_tokens=2)
    )
    return eng


_PEERS: dict[str, Any] = {}


def hf_model(eng: LocalEngine) -> Any:
    """The model as `from_pretrained` gives it, which a user's HF `generate` runs on; loaded
    once per process. On the CPU the engine's own object holds its matmul weights transposed
    for decoding (`bot/engine/cpu_weights.py`); the peer must not borrow that. Elsewhere (a GPU,
    bf16) the engine's object is the plain model and is shared."""
    from bot.engine.cpu_weights import classes

    if not any(isinstance(m, classes()["DecodeLinear"]) for m in eng.model.modules()):
        return eng.model
    if eng.model_path not in _PEERS:
        from bot.engine.loading import load_model

        _PEERS[eng.model_path] = load_model(eng.model_path, eng.plan)
    return _PEERS[eng.model_path]


# --------------------------------------------------------------------------------------------


def hf_sampling(p: GenerationParams) -> dict[str, Any]:
    """`model.generate` arguments for the same sampling as `p` (the bot's default)."""
    if p.temperature <= 0:
        return {"do_sample": False, "repetition_penalty": p.repetition_penalty}
    return {
        "do_sample": True,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "repetition_penalty": p.repetition_penalty,
    }


def hf_generate(model: Any, tok: Any, prompts: list[str], p: GenerationParams) -> list[int]:
    """One static batch through HF `generate`, left-padded; new tokens of each row (to EOS)."""
    return hf_generate_texts(model, tok, prompts, p)[0]


def hf_generate_texts(
    model: Any, tok: Any, prompts: list[str], p: GenerationParams
) -> tuple[list[int], list[str]]:
    """`hf_generate`, also returning each row's new text (to EOS), to compare with ours."""
    import torch

    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "left"
    device = model.get_input_embeddings().weight.device
    enc = tok(prompts, return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=p.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            **hf_sampling(p),
        )
    eos = set(eos_ids(tok, model))
    counts, texts = [], []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        n = next((i for i, t in enumerate(row) if t in eos), len(row))
        counts.append(n)
        texts.append(tok.decode(row[:n], skip_special_tokens=True))
    return counts, texts


async def p1(model: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Batched vs one-at-a-time aggregate tokens/s, 8 channels submitting at once; and the
    batched figure against HF `generate` with a static batch of the same prompts.

    One engine, one model: between rounds only the batch cap changes (MAX_BATCH=1 runs the
    same requests through the same scheduler one at a time). Rounds alternate and the best of
    each is kept, so a neighbour's burst of CPU load does not decide the ratio. HF generate
    runs on the model as `from_pretrained` loads it (`hf_model`), in this thread, while the
    engine is idle; then the burst's floor on this machine (`burst_floor`).
    """
    eng = await started(model, args, max_batch=args.channels, kv_cache_mb=0)
    try:
        prompts = [
            render_chat(SYSTEM, history(eng.count_tokens, args.p1_prompt, seed=c))
            for c in range(args.channels)
        ]
        sizes = [len(eng.tokenizer(p).input_ids) for p in prompts]
        # the bot's default sampling (temperature 0.7, top-p, top-k, repetition penalty), seeded;
        # with --greedy, greedy decoding, so ours and HF generate must write the same tokens
        params = [
            sampling(args, max_new_tokens=args.new_tokens, seed=c) for c in range(args.channels)
        ]
        best: dict[int | str, float] = {}
        texts: dict[int, list[str]] = {}
        for _ in range(args.rounds):
            for cap in (1, args.channels):
                eng.batcher.scheduler.max_batch = cap
                t0 = time.perf_counter()
                gens = [
                    eng.generate(p, q, cache_key=str(c))
                    for c, (p, q) in enumerate(zip(prompts, params, strict=True))
                ]
                texts[cap] = await asyncio.gather(*(g.text_all() for g in gens))
                rate = sum(g.stats.new_tokens for g in gens) / (time.perf_counter() - t0)
                best[cap] = max(best.get(cap, 0.0), rate)
            if args.peer:
                t0 = time.perf_counter()
                counts, hf_texts = hf_generate_texts(hf_model(eng), eng.tokenizer, prompts, params[0])
                best["hf s"] = min(best.get("hf s", float("inf")), time.perf_counter() - t0)
                best["hf"] = sum(counts) / best["hf s"]
        tokens = sum(g.stats.new_tokens for g in gens)
        for cap in (1, args.channels):
            print(f"  MAX_BATCH={cap}: best {best[cap]:.1f} tokens/s of {args.rounds} rounds")
        if args.peer:
            same = sum(a == b for a, b in zip(texts[args.channels], hf_texts, strict=True))
            print(
                f"  HF generate, static batch of {args.channels}: best {best['hf']:.1f} tokens/s "
                f"(same prompts and sampling, {sum(counts)} tokens"
                + (f"; same text as ours in {same} of {len(hf_texts)})" if args.greedy else ")")
            )
        print(
            f"  {args.channels} channels, prompts {min(sizes)}-{max(sizes)} tokens, "
            f"{tokens} tokens per round; same text batched and alone: "
            f"{texts[1] == texts[args.channels]}"
        )
        if args.peer:
            print(burst_floor(eng, prompts, params[0], max(counts), best["hf s"]))
        peer = best[args.channels] / best["hf"] if args.peer else float("nan")
        return best[args.channels] / best[1], peer
    finally:
        await eng.close()


def burst_floor(
    eng: LocalEngine, prompts: list[str], p: GenerationParams, steps: int, hf_s: float
) -> str:
    """P1's floor on this machine: HF's own prefill of the batch (the same compute-bound work
    any engine does) plus each later step's matmuls alone at the batch's row count
    (`limits.matmul_seconds`), in the faster of the engine's weight layout and transformers'.
    HF's whole run over that floor is the most any engine with these kernels can gain on it."""
    from bench.limits import matmul_seconds, significant

    t0 = time.perf_counter()
    hf_generate_texts(hf_model(eng), eng.tokenizer, prompts, replace(p, max_new_tokens=1))
    prefill = time.perf_counter() - t0
    ours = matmul_seconds(eng.model, len(prompts))
    peer = hf_model(eng)  # the engine's own object where it is not rearranged: measured once
    theirs = ours if peer is eng.model else matmul_seconds(peer, len(prompts))
    floor = prefill + (steps - 1) * min(ours, theirs)
    ms = [significant(1000 * t) for t in (min(ours, theirs), ours, theirs)]
    return (  # three significant digits: a small test model's figures do not print as 0.00
        f"  floor: HF's prefill of the batch {significant(prefill)} s + {steps - 1} steps x the "
        f"matmuls alone at {len(prompts)} rows {ms[0]} ms (engine's layout {ms[1]}, "
        f"transformers' {ms[2]}) = {significant(floor)} s; HF's whole batch {significant(hf_s)} "
        f"s: no engine with these kernels runs more than {hf_s / floor:.2f}x HF"
    )


def sampling(args: argparse.Namespace, **kw: Any) -> GenerationParams:
    """The bot's default sampling, or greedy with no repetition penalty under --greedy."""
    if args.greedy:
        kw.update(temperature=0.0, repetition_penalty=1.0)
    return GenerationParams(**kw)


async def single(model: Path, args: argparse.Namespace) -> tuple[float, float, bool]:
    """One stream alone: our engine against HF `generate` on the same model object, the same
    prompt (~`--p1-prompt` tokens) and the same decoding, best of `--rounds` each; tokens/s
    over the whole reply (prefill included), and whether both wrote the same text."""
    eng = await started(model, args, max_batch=1, kv_cache_mb=0)
    try:
        prompt = render_chat(SYSTEM, history(eng.count_tokens, args.p1_prompt, seed=7))
        params = sampling(args, max_new_tokens=args.new_tokens, seed=1)
        best = {"ours": 0.0, "hf": 0.0}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            gen = eng.generate(prompt, params)
            ours = await gen.text_all()
            best["ours"] = max(best["ours"], gen.stats.new_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            counts, texts = hf_generate_texts(hf_model(eng), eng.tokenizer, [prompt], params)
            best["hf"] = max(best["hf"], counts[0] / (time.perf_counter() - t0))
        same = ours == texts[0]
        print(
            f"  prompt {eng.count_tokens(prompt)} tokens, reply {gen.stats.new_tokens} tokens "
            f"(HF {counts[0]}); ours best {best['ours']:.1f} tokens/s, HF generate best "
            f"{best['hf']:.1f} tokens/s of {args.rounds} rounds; same text: {same}"
        )
        columns = [(f"ours, {eng.plan.dtype}", best["ours"], eng.model)]
        columns.append((f"HF generate, {eng.plan.dtype}", best["hf"], hf_model(eng)))
        if args.model:
            columns += dtype_columns(eng, prompt, params, best["ours"], args)
        physical_limit(eng.model, columns, args)
        return best["ours"], best["hf"], same
    finally:
        await eng.close()


def dtype_columns(
    eng: LocalEngine, prompt: str, params: GenerationParams, ours: float, args: argparse.Namespace
) -> list[tuple[str, float, Any]]:
    """S with --model: HF `generate` in the model's DTYPE=auto dtype (`--hf-dtype` to name
    another) beside the engine's fp32 column, and greedy agreement bf16 vs fp32 on
    `bench/agreement.py`'s prompts. A model in another dtype is loaded as the bot loads it with
    that DTYPE (`load_model`): a cast copy (`.to(bf16)`) would also cast the rotary frequencies,
    which a bf16 load keeps in fp32, and measure a worse agreement than the bot's."""
    from bench.agreement import greedy_agreement
    from bot.engine.loading import load_model, plan_load

    gpu = args.device.startswith("cuda")
    device_map = args.device if gpu else "none"
    plan = plan_load(args.hf_dtype, device_map, cuda=gpu)
    why = plan.why if args.hf_dtype == "auto" else "set by --hf-dtype"
    copies: dict[str, Any] = {eng.plan.dtype: hf_model(eng)}

    def model_in(dtype: str) -> Any:
        if dtype not in copies:
            copies[dtype] = load_model(eng.model_path, plan_load(dtype, device_map, cuda=gpu))
        return copies[dtype]

    found: list[tuple[str, float, Any]] = []
    if plan.dtype == eng.plan.dtype:
        print(f"  HF generate in {args.hf_dtype} dtype: {plan.dtype} ({why}), as above")
    else:
        other, rate = model_in(plan.dtype), 0.0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            counts, _ = hf_generate_texts(other, eng.tokenizer, [prompt], params)
            rate = max(rate, counts[0] / (time.perf_counter() - t0))
        found.append((f"HF generate, {plan.dtype}", rate, other))
        print(
            f"  HF generate in {plan.dtype} ({why}): best {rate:.1f} tokens/s of "
            f"{args.rounds} rounds; ours ({eng.plan.dtype}) / HF {plan.dtype} = "
            f"{ours / rate:.2f}x"
        )
    agreement = greedy_agreement(
        model_in("bfloat16"), model_in("float32"), eng.tokenizer, args.agree_tokens
    )
    print(f"  {agreement.describe('bf16', 'fp32')}")
    return found


def physical_limit(model: Any, columns: list[tuple[str, float, Any]], args: argparse.Namespace):
    """The distance to the physical limit: the memory bandwidth measured here (same torch
    threads) beside each column's bytes/s = weight bytes read per token x tokens/s (over the
    whole reply, prefill included, so a little under the decode rate)."""
    import torch

    from bench.limits import BANDWIDTH_MIB, limit_line, memory_bandwidth_gbs, weight_bytes

    device = model.get_input_embeddings().weight.device
    bandwidth = memory_bandwidth_gbs(device)
    print(
        f"  memory bandwidth: {bandwidth:.2f} GB/s (torch sum over {BANDWIDTH_MIB} MiB on "
        f"{device}, {torch.get_num_threads()} threads, best of 5)"
    )
    for label, rate, weights in columns:
        print(limit_line(label, rate, weight_bytes(weights), bandwidth))


def arrivals(args: argparse.Namespace) -> list[tuple[float, int]]:
    """(arrival offset in seconds, reply tokens) of P4's requests: deterministic, 16-256 tokens."""
    lo, hi = args.p4_min, args.p4_max
    return [(k * args.gap, lo + (k * 97) % (hi - lo + 1)) for k in range(args.p4_requests)]


async def p4_ours(eng: LocalEngine, prompts: list[str], plan: list[tuple[float, int]]) -> Any:
    """Submit each request at its arrival time; (tokens, makespan, mean latency)."""
    t0 = time.perf_counter()

    async def one(k: int) -> tuple[int, float]:
        at, n = plan[k]
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        arrived = time.perf_counter()
        gen = eng.generate(prompts[k], GenerationParams(max_new_tokens=n, seed=k))
        await gen.text_all()
        return gen.stats.new_tokens, time.perf_counter() - arrived

    done = await asyncio.gather(*(one(k) for k in range(len(plan))))
    makespan = time.perf_counter() - t0
    return sum(t for t, _ in done), makespan, statistics.mean(lat for _, lat in done)


def p4_static(
    eng: LocalEngine, prompts: list[str], plan: list[tuple[float, int]], batch: int
) -> Any:
    """A static-batching server on HF generate: take whatever has arrived (up to `batch`),
    generate to the longest reply asked, answer them all at the end; repeat."""
    t0 = time.perf_counter()
    pending = list(range(len(plan)))
    tokens, latencies = 0, []
    while pending:
        now = time.perf_counter() - t0
        if plan[pending[0]][0] > now:
            time.sleep(plan[pending[0]][0] - now)
            now = time.perf_counter() - t0
        take = [k for k in pending if plan[k][0] <= now][:batch]
        pending = [k for k in pending if k not in take]
        longest = max(plan[k][1] for k in take)
        p = GenerationParams(max_new_tokens=longest, seed=take[0])
        counts = hf_generate(hf_model(eng), eng.tokenizer, [prompts[k] for k in take], p)
        end = time.perf_counter() - t0
        for k, n in zip(take, counts, strict=True):
            tokens += min(n, plan[k][1])  # what the request asked for; the rest is waste
            latencies.append(end - plan[k][0])
    return tokens, time.perf_counter() - t0, statistics.mean(latencies)


async def p4(model: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Requests arriving over time: the engine vs a static-batching HF generate server."""
    eng = await started(model, args, max_batch=args.channels, kv_cache_mb=0)
    try:
        plan = arrivals(args)
        prompts = [
            render_chat(SYSTEM, history(eng.count_tokens, args.p1_prompt, seed=200 + k))
            for k in range(len(plan))
        ]
        ours = await p4_ours(eng, prompts, plan)
        static = p4_static(eng, prompts, plan, args.channels)
        for name, (tok, span, lat) in (("ours", ours), ("HF static server", static)):
            print(
                f"  {name}: {tok} tokens in {span:.1f} s = {tok / span:.1f} tokens/s, "
                f"mean latency {lat:.2f} s"
            )
        print(
            f"  {len(plan)} requests every {args.gap:g} s, replies {args.p4_min}-{args.p4_max} "
            f"tokens, batches up to {args.channels}"
        )
        return (ours[0] / ours[1]) / (static[0] / static[1]), ours[2] / static[2]
    finally:
        await eng.close()


async def p2(model: Path, args: argparse.Namespace) -> float:
    """Time to first token for the next message of a ~3,500-token channel: cached vs cold."""
    eng = await started(model, args, max_batch=8, kv_cache_mb=args.kv_cache_mb)
    try:
        turns = history(eng.count_tokens, args.p2_history, seed=99)
        prompt = render_chat(SYSTEM, turns)
        short = sampling(args, max_new_tokens=16, seed=5)  # same seed: same reply cold or warm
        reply = await eng.generate(prompt, short, cache_key="chan").text_all()
        warm, cold, reused, sizes = [], [], [], []
        for k in range(args.trials):
            prompt = next_message(prompt, reply, k)
            c = eng.generate(prompt, short)  # no cache key: computed from scratch
            await c.text_all()
            w = eng.generate(prompt, short, cache_key="chan")
            reply = await w.text_all()
            cold.append(ttft(c.stats))
            warm.append(ttft(w.stats))
            reused.append(w.stats.reused_tokens)
            sizes.append(w.stats.prompt_tokens)
        wm, cm = statistics.median(warm), statistics.median(cold)
        print(
            f"  prompt {min(sizes)}-{max(sizes)} tokens, reused {min(reused)}-{max(reused)}; "
            f"TTFT median cold {cm * 1000:.1f} ms, with prefix cache {wm * 1000:.1f} ms "
            f"({args.trials} messages)"
        )
        return wm / cm
    finally:
        await eng.close()


async def p5(model: Path, args: argparse.Namespace, recall: str) -> tuple[float, int, str]:
    """P2 through the bot's own prompt path (memory + `Conversations.prepare`) in a channel whose
    history is twice the window, with long-term recall `on` or `off`: the cached prefix's TTFT
    against a cold prompt, and how many turns recall added per prompt (median)."""
    from bot.conversation import Conversations
    from bot.memory import Memory
    from bot.settings import load_settings

    eng = await started(model, args, max_batch=8, kv_cache_mb=args.kv_cache_mb)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(
                env={"DB_PATH": f"{tmp}/p5.db", "RECALL": recall}, env_file=None
            )
            memory = await Memory.open(settings.db_path)
            try:
                conv = Conversations(settings, memory, eng)
                channel, used = 5150, 0
                facts = [f"remember: the vault{k} code is {4400 + k} (zed{k})" for k in range(8)]
                i = 0
                while used < 2 * settings.context_tokens:  # older turns the window must drop
                    text = facts[i] if i < len(facts) else chatter(i, 30)
                    role = "user" if i % 2 == 0 or i < len(facts) else "assistant"
                    await memory.turns.add(
                        channel, role, text, name="ann", tokens=eng.count_tokens(text)
                    )
                    used += eng.count_tokens(text) + 8
                    i += 1
                short = GenerationParams(max_new_tokens=16, seed=5)
                warm, cold, recalled, reused = [], [], [], []
                for k in range(args.trials + 1):
                    qid = await conv.record_user(
                        channel, f"what was the vault{k % 8} code again?", name="bob"
                    )
                    job = await conv.prepare(channel, reply_to=qid)
                    assert job is not None
                    recalled.append(len(job.prompt.recalled))
                    c = eng.generate(job.prompt.text, short)  # no cache key: from scratch
                    await c.text_all()
                    w = eng.generate(job.prompt.text, short, cache_key=job.cache_key)
                    reply = await w.text_all()
                    await conv.record_assistant(channel, reply or "ok", message_ids=[7000 + k])
                    if k:  # the first message only warms the channel's cache
                        cold.append(ttft(c.stats))
                        warm.append(ttft(w.stats))
                        reused.append(f"{w.stats.reused_tokens}/{w.stats.prompt_tokens}")
            finally:
                await memory.close()
        ratio = statistics.median(warm) / statistics.median(cold)
        return ratio, int(statistics.median(recalled)), ", ".join(reused)
    finally:
        await eng.close()


def ttft(stats: Any) -> float:
    """Time to first text; a reply that ended before any text counts its whole time."""
    t = stats.time_to_first_token
    return t if t is not None else stats.finished_at - stats.queued_at


class TokenizerOnly(Engine):
    """Counts tokens like the real engine; never generates (P3 stops at the submit)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.info = EngineInfo("bench", "tokenizer only")

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)


async def p3(args: argparse.Namespace) -> float | None:
    """Message event to engine submit: record_user + prepare, 2,000 stored turns."""
    if (
        not (LLAMA_TOKENIZER / "tokenizer.model").is_file()
        and not (LLAMA_TOKENIZER / "tokenizer.json").is_file()
    ):
        print(f"  skipped: the Llama 2 tokenizer fixture is absent ({LLAMA_TOKENIZER})")
        return None
    from transformers import AutoTokenizer

    from bot.conversation import Conversations
    from bot.memory import Memory
    from bot.settings import load_settings

    tok = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER)
    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(env={"DB_PATH": f"{tmp}/bench.db"}, env_file=None)
        memory = await Memory.open(settings.db_path)
        try:
            conv = Conversations(settings, memory, TokenizerOnly(tok))
            channel = 4242
            for i in range(args.p3_turns):
                if i % 2 == 0:
                    await conv.record_user(
                        channel,
                        chatter(i, 25),
                        name=f"User{i % 7}",
                        author_id=i % 7,
                        message_id=10_000 + i,
                    )
                else:
                    await conv.record_assistant(channel, chatter(i, 35), message_ids=[10_000 + i])
            times = []
            for k in range(args.p3_messages):
                t0 = time.perf_counter()
                turn = await conv.record_user(
                    channel,
                    chatter(50_000 + k, 20),
                    name="Alice",
                    author_id=1,
                    message_id=90_000 + 2 * k,
                )
                job = await conv.prepare(channel, None, reply_to=turn)
                times.append(time.perf_counter() - t0)
                assert job is not None
                await conv.record_assistant(
                    channel, chatter(60_000 + k, 30), message_ids=[90_001 + 2 * k]
                )
            times.sort()
            p50 = statistics.median(times)
            p90 = times[int(len(times) * 0.9)]
            print(
                f"  {args.p3_turns} stored turns, {args.p3_messages} messages, prompt "
                f"{job.prompt.tokens} tokens: p50 {p50 * 1000:.2f} ms, p90 {p90 * 1000:.2f} ms"
            )
            return p50
        finally:
            await memory.close()


async def pq(model: Path, args: argparse.Namespace, label: str) -> None:
    """Q: `--quant` (none,8bit,4bit) on the same model, one after the other in this process:
    load time, footprint, one stream and `--channels` at once, as ratios against the first
    (`bot.bench_quant`, what `hermes-bot bench --quant` prints)."""
    from bot.bench_quant import compare, parse_quants, table_lines
    from bot.settings import load_settings

    env = {"MODEL": str(model), "MAX_BATCH": str(args.channels), "KV_CACHE_MB": "0"}
    if args.device == "cpu":
        env |= {"DTYPE": "float32", "DEVICE_MAP": "none"}
    else:
        env |= {"DTYPE": "auto", "DEVICE_MAP": args.device}
    settings = load_settings(env=env, env_file=None)
    rows = await compare(
        settings, parse_quants(args.quant), channels=args.channels, reply_tokens=args.q_tokens
    )
    print("Q " + "\n  ".join(table_lines(rows, label)))


# --------------------------------------------------------------------------------------------


async def p6(args: argparse.Namespace) -> None:
    """ENGINE=llamacpp batched and one at a time beside each --server (bot/bench_compare.py)."""
    from bot import bench_compare
    from bot.engine.llamacpp import LlamaCppEngine
    from bot.engine.openai import OpenAIEngine

    if not args.model or not args.model.endswith(".gguf"):
        sys.exit("P6 needs --model FILE.gguf")
    n = args.channels

    def llama(batch: int) -> LlamaCppEngine:
        return LlamaCppEngine(args.model, threads=args.llama_threads, max_batch=batch,
                              context_tokens=args.llama_ctx)  # fmt: skip

    columns: list[tuple[str, Any]] = [
        (f"llamacpp batched x{n}", llama(n)),
        ("llamacpp one at a time", llama(1)),
    ]
    tokenizer = args.tokenizer or str(Path(args.model).parent / "hf")
    for url in args.server:
        columns.append((url, OpenAIEngine(base_url=url, model="model", tokenizer=tokenizer)))
    print(
        f"P6 engines side by side: {Path(args.model).name}, llama.cpp threads {args.llama_threads}"
    )
    found = await bench_compare.compare(
        columns, stories, tokens=args.p6_tokens, channels=n, rounds=args.rounds
    )
    base = 2 if args.server else 1
    print(bench_compare.table(found, tokens=args.p6_tokens, channels=n, baseline=base))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--model",
        help="model folder or .gguf file (converted once to a temporary folder); default: "
        "build a small random Llama",
    )
    ap.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding everywhere (the default is the bot's sampling): ours and HF "
        "generate then write the same tokens, and the bench says whether they did",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128, help="reply tokens per channel in P1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--p1-prompt", type=int, default=200, help="prompt tokens per channel in P1")
    ap.add_argument(
        "--p2-history", type=int, default=3300, help="history tokens before P2's first message"
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kv-cache-mb", type=float, default=8192)
    ap.add_argument("--p3-turns", type=int, default=2000)
    ap.add_argument("--p3-messages", type=int, default=200)
    ap.add_argument(
        "--only",
        default="1234",
        help="which of P1, P2, P3, P4, P5, Q and S (single stream) to run, e.g. 13, q or 12s",
    )
    ap.add_argument(
        "--quant", default="none,8bit,4bit", help="Q: quantizations compared, the first is the base"
    )
    ap.add_argument("--q-tokens", type=int, default=64, help="Q: reply tokens per request")
    ap.add_argument(
        "--hf-dtype",
        default="auto",
        help="S with --model: dtype of the extra HF generate column (auto: what DTYPE=auto "
        "picks on this machine)",
    )
    ap.add_argument(
        "--agree-tokens", type=int, default=32,
        help="S with --model: greedy tokens per prompt compared bf16 vs fp32",
    )  # fmt: skip
    ap.add_argument(
        "--no-peer", dest="peer", action="store_false", help="skip HF generate beside P1"
    )
    ap.add_argument("--gap", type=float, default=0.15, help="P4: seconds between arrivals")
    ap.add_argument("--p4-requests", type=int, default=24)
    ap.add_argument("--p4-min", type=int, default=16, help="P4: shortest reply asked")
    ap.add_argument("--p4-max", type=int, default=256, help="P4: longest reply asked")
    ap.add_argument(
        "--threads",
        type=int,
        default=-1,
        help="torch intra-op threads; default 1 on the CPU (see the module docstring: the "
        "engine's worker and HF generate must not run two spinning OpenMP pools), torch's own "
        "default on a GPU; 0: torch's default everywhere",
    )
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="P6: an OpenAI-compatible server (base URL with /v1) as a column; repeatable",
    )
    ap.add_argument("--tokenizer", help="P6: tokenizer folder for the servers' token counts")
    ap.add_argument("--llama-threads", type=int, default=2, help="P6: llama.cpp THREADS")
    ap.add_argument(
        "--llama-ctx", type=int, default=1024,
        help="P6: CONTEXT_TOKENS per llama.cpp slot (llama-server -c 8192 --parallel 8: 1024)",
    )  # fmt: skip
    ap.add_argument("--p6-tokens", type=int, default=64, help="P6: reply tokens per request")
    args = ap.parse_args()
    if args.only == "6":
        await p6(args)
        return

    import torch

    if args.threads < 0:
        args.threads = 0 if args.device.startswith("cuda") else 1
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda asked, but CUDA is not available")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model and is_gguf(args.model):  # dequantized once, not in every part
            from bot.gguf import convert_gguf

            model = convert_gguf(args.model, Path(tmp) / "converted")
            label = f"{Path(args.model).name} (dequantized to fp32) on {args.device}"
        elif args.model:
            model = Path(args.model)
            label = f"{model.name} on {args.device}"
        else:
            from tests.tiny import make_model

            model = make_model(Path(tmp) / "small", hidden=args.hidden, layers=args.layers)
            label = f"random Llama hidden {args.hidden}, {args.layers} layers, on {args.device}"
        print(f"hermes-discord serving bench: {label}; torch threads {torch.get_num_threads()}")
        gpu = args.device.startswith("cuda")
        decoding = "greedy" if args.greedy else "the bot's default sampling (seeded)"
        print(f"decoding: {decoding}")
        if "s" in args.only.lower():
            print("S single stream, ours vs HF generate (one request, same prompt)")
            ours, hf, same = await single(model, args)
            print(f"S = {ours:.1f} tokens/s, HF generate {hf:.1f}: ours / HF = {ours / hf:.2f}x")
        if "1" in args.only:
            print("P1 aggregate tokens/s, batched vs one-at-a-time")
            r, peer = await p1(model, args)
            target = 6.0 if gpu else 3.0
            vs = f"; ours / HF generate = {peer:.2f}x" if args.peer else ""
            print(
                f"P1 = {r:.2f}x  (target >= {target:g}x: {'met' if r >= target else 'NOT met'}){vs}"
            )
        if "2" in args.only:
            print("P2 time to first token, prefix cache vs cold")
            r = await p2(model, args)
            print(f"P2 = {r:.3f}x  (target <= 0.2x: {'met' if r <= 0.2 else 'NOT met'})")
        if "5" in args.only:
            print("P5 = P2 through memory and Conversations.prepare, recall off vs on")
            for mode in ("off", "on"):
                r, n, reused = await p5(model, args, mode)
                print(
                    f"  recall {mode}: P2 = {r:.3f}x, recalled turns per prompt {n}, "
                    f"prompt tokens reused from the cache {reused}"
                )
        if "3" in args.only:
            print("P3 message event to engine submit")
            p50 = await p3(args)
            if p50 is not None:
                ok = "met" if p50 <= 0.005 else "NOT met"
                print(f"P3 p50 = {p50 * 1000:.2f} ms  (target <= 5 ms: {ok})")
        if "4" in args.only:
            print("P4 requests arriving over time, ours vs a static-batching HF generate server")
            thr, lat = await p4(model, args)
            print(
                f"P4 throughput ours / static = {thr:.2f}x, mean latency ours / static = {lat:.2f}x"
            )
        if "q" in args.only:
            await pq(model, args, label)
        if not gpu:
            print("GPU: not run (no --device cuda); the 7B GPU figures need a GPU and the weights")


if __name__ == "__main__":
    asyncio.run(main())
