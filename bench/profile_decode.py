"""Where a decode step of the local engine's batcher (`bot/engine/batching.py`) spends its time.

    python bench/profile_decode.py                      # SmolLM2 from the cache, 1 thread
    python bench/profile_decode.py --model FOLDER --rows 8 --tokens 64

The batcher runs on this thread (as it runs on the engine's worker), one or `--rows` requests
of `--prompt-tokens` prompt tokens and `--tokens` reply tokens each, the bot's default sampling
(seeded) unless `--greedy`. Three passes over the same requests:

1. plain: wall time per decode step, nothing attached (the reference);
2. cProfile: each direct callee of `Batcher._decode_step` (the model's forward, sampling,
   accepting tokens: decoding text, stop strings, hand-over), and the step's own Python, as
   shares of the step (cProfile slows Python more than kernels: the shares lean to Python);
3. torch.profiler: self time of the aten ops, grouped (matmuls, attention, the rest), against
   the plain step's wall time; what is not an op is Python and dispatch.

Figures only, printed; nothing is asserted. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import queue
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot.benchmark import SYSTEM, history  # noqa: E402
from bot.engine import GenerationParams  # noqa: E402
from bot.engine.batching import Batcher  # noqa: E402
from bot.engine.cpu_weights import classes, prepare_for_cpu_decoding  # noqa: E402
from bot.engine.loading import load_model, load_tokenizer, plan_load  # noqa: E402
from bot.engine.request import EngineRequest  # noqa: E402
from bot.prompt import render_chat  # noqa: E402

SMOLLM2 = Path(os.environ.get("HERMES_SMOLLM2_DIR", "~/.cache/hermes-discord/smollm2")) / "hf"

#: aten ops grouped for the torch.profiler pass (by name prefix), the rest is "other ops".
GROUPS = {
    "matmuls (linear, mm, addmm, bmm)": (
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::matmul",
        "aten::linear",
    ),
    "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "KV cache cat/copy": ("aten::cat", "aten::copy_", "aten::index"),
}


def run(model: Any, tok: Any, prompts: list[str], params: GenerationParams) -> list[EngineRequest]:
    """Every prompt through a new `Batcher`'s `serve` on this thread (as on the engine's worker:
    one batch of `len(prompts)` rows, no prefix cache); returns the finished requests."""

    async def go() -> list[EngineRequest]:
        todo: queue.Queue[EngineRequest | None] = queue.Queue()
        reqs = [EngineRequest(p, params) for p in prompts]
        for r in reqs:
            todo.put(r)
        todo.put(None)  # serve returns once every request has ended
        Batcher(model, tok, max_batch=len(prompts), kv_bytes=0).serve(todo)
        return reqs

    return asyncio.run(go())


def decode_steps(reqs: list[EngineRequest]) -> int:
    """Decode steps the batch ran: the longest reply less its first token (sampled in prefill)."""
    return max(r.stats.new_tokens for r in reqs) - 1


def callee_shares(prof: cProfile.Profile) -> tuple[float, list[tuple[str, float]]]:
    """(total time in `_decode_step`, [(callee, cumulative time from it)]) plus its own time."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    step = next(k for k in stats if k[2] == "_decode_step")
    total, own = stats[step][3], stats[step][2]
    found = []
    for func, (_cc, _nc, _tt, _ct, callers) in stats.items():
        if step in callers:
            name = f"{Path(func[0]).name}:{func[2]}" if func[0] != "~" else func[2]
            found.append((name, callers[step][3]))
    found.append(("_decode_step's own Python", own))
    return total, sorted(found, key=lambda x: -x[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=str(SMOLLM2.expanduser()), help="HF model folder")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", type=int, default=1, help="requests decoded together")
    ap.add_argument("--tokens", type=int, default=64, help="reply tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--greedy", action="store_true", help="greedy, no repetition penalty")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time the plain pass with each fused decoder layer's tensor work (project_in, "
        "project_out) under torch.compile (dynamic shapes, inductor), against eager in this "
        "process",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, plan_load(args.dtype, "none", cuda=False))
    prepare_for_cpu_decoding(model)  # as LocalEngine holds it

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    prompts = [
        render_chat(SYSTEM, history(count, args.prompt_tokens, seed=s)) for s in range(args.rows)
    ]
    extra = {"temperature": 0.0, "repetition_penalty": 1.0} if args.greedy else {}
    params = GenerationParams(max_new_tokens=args.tokens, seed=1, **extra)
    run(model, tok, prompts, GenerationParams(max_new_tokens=4))  # warm-up
    print(
        f"decode-step profile: {Path(args.model).name}, {args.dtype}, {args.rows} row(s), "
        f"prompt ~{args.prompt_tokens} tokens, {args.tokens} tokens, torch threads "
        f"{torch.get_num_threads()}, {'greedy' if args.greedy else 'default sampling (seeded)'}"
    )

    step, prefill, reqs = plain(model, tok, prompts, params)
    steps = decode_steps(reqs)
    print(
        f"plain: {1000 * step:.1f} ms per decode step ({steps} steps; prefill {1000 * prefill:.0f} ms)"
    )
    if args.compile:
        compiled_against_eager(model, tok, prompts, params, reqs)

    prof = cProfile.Profile()
    prof.enable()
    reqs = run(model, tok, prompts, params)
    prof.disable()
    total, shares = callee_shares(prof)
    print(f"cProfile: {1000 * total / steps:.1f} ms per decode step (profiled)")
    for name, t in shares:
        if t / total >= 0.005:
            print(f"  {100 * t / total:5.1f}%  {name}")

    # decode alone = (prefill + decode) - (prefill + one token), each under the profiler
    full, full_ops = op_times(model, tok, prompts, params)
    first, first_ops = op_times(model, tok, prompts, replace(params, max_new_tokens=1))
    wall_d = full - first
    per_op = {k: t - first_ops.get(k, 0.0) for k, t in full_ops.items()}
    grouped: dict[str, float] = dict.fromkeys([*GROUPS, "other ops"], 0.0)
    for key, t in per_op.items():
        grouped[next((g for g, names in GROUPS.items() if key.startswith(names)), "other ops")] += t
    ops = sum(grouped.values())
    print(
        f"torch.profiler, decode only: {1000 * wall_d / steps:.1f} ms per step (profiled), aten "
        f"ops' self time {100 * ops / wall_d:.0f}% of it; the rest is Python and dispatch"
    )
    for group, t in grouped.items():
        print(f"  {100 * t / wall_d:5.1f}%  {group}")
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    print("  top ops: " + ", ".join(f"{k} {100 * t / wall_d:.1f}%" for k, t in top))


def plain(
    model: Any, tok: Any, prompts: list[str], params: GenerationParams
) -> tuple[float, float, list[EngineRequest]]:
    """(seconds per decode step, prefill seconds, the finished requests), nothing attached:
    decode alone is (prefill + decode) less (prefill + one token)."""
    t0 = time.perf_counter()
    reqs = run(model, tok, prompts, params)
    wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(model, tok, prompts, replace(params, max_new_tokens=1))
    prefill = time.perf_counter() - t0
    steps = decode_steps(reqs)
    if steps <= 0:
        sys.exit("no decode steps: every reply ended at its first token; try --greedy")
    return (wall - prefill) / steps, prefill, reqs


def compiled_against_eager(
    model: Any, tok: Any, prompts: list[str], params: GenerationParams, eager_reqs: Any
) -> None:
    """The plain pass with each fused decoder layer's tensor work (`project_in`, `project_out`:
    norms, matmuls, RoPE, MLP; the cache update between them stays eager, since transformers'
    cache is Python that changes shape every step) under `torch.compile` (inductor, dynamic
    shapes), alternated with eager, best of two each. The engine compiles nothing: this is the
    measurement that keeps it so on a CPU."""
    import torch

    layers = [m for m in model.modules() if isinstance(m, classes()["FusedDecoderLayer"])]
    if not layers:
        print("torch.compile: not measured (no fused decoder layers in this model)")
        return

    parts = [(layer, n) for layer in layers for n in ("project_in", "project_out")]
    eager = {part: getattr(*part) for part in parts}
    compiled = {part: torch.compile(fn, dynamic=True) for part, fn in eager.items()}

    def use(fns: dict[tuple[Any, str], Any]) -> None:
        for (layer, name), fn in fns.items():
            setattr(layer, name, fn)  # an instance attribute shadows the method

    use(compiled)
    t0 = time.perf_counter()
    run(model, tok, prompts, GenerationParams(max_new_tokens=4))  # compiles
    warm = time.perf_counter() - t0
    best: dict[str, float] = {}
    same = True
    for _ in range(2):
        for name, fns in (("eager", eager), ("compiled", compiled)):
            use(fns)
            step, _, reqs = plain(model, tok, prompts, params)
            best[name] = min(step, best.get(name, step))
            same &= [r.history.tolist() for r in reqs] == [r.history.tolist() for r in eager_reqs]
    for layer, name in parts:
        delattr(layer, name)  # the class's methods again
    print(
        f"torch.compile: {1000 * best['compiled']:.1f} ms per decode step vs eager "
        f"{1000 * best['eager']:.1f} (compiled / eager {best['compiled'] / best['eager']:.2f}x; "
        f"compiling took {warm:.1f} s; same tokens: {same})"
    )


def op_times(
    model: Any, tok: Any, prompts: list[str], params: GenerationParams
) -> tuple[float, dict[str, float]]:
    """(wall seconds, self seconds per aten op) of one `run` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as tp:
        t0 = time.perf_counter()
        run(model, tok, prompts, params)
        wall = time.perf_counter() - t0
    return wall, {ev.key: ev.self_cpu_time_total / 1e6 for ev in tp.key_averages()}


if __name__ == "__main__":
    main()
