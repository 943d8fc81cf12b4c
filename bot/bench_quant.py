"""`hermes-bot bench --quant none,8bit,4bit`: each QUANTIZATION on the same model, in one run.

For each quantization the model is loaded through the bot's engine with the same settings
otherwise, then measured with `hermes-bot bench`'s own probes (`bot.benchmark.single_stream`
and `aggregate`): load time, footprint (`model.get_memory_footprint()`), one stream's decode
tokens/s and the aggregate tokens/s of N channels at once. Figures are printed beside their
ratio to the first quantization named (the baseline, measured in the same process).
`bench/engine.py --only q` prints the same table.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from bot.benchmark import SYSTEM, aggregate, single_stream
from bot.engine import EngineError, GenerationParams, LocalEngine, make_engine, params_from_settings
from bot.engine.quantize import QUANTIZATIONS
from bot.prompt import render_chat


@dataclass
class QuantRow:
    quantization: str
    load_s: float = 0.0
    footprint_mb: float = 0.0
    one_stream_tps: float = 0.0
    channels: int = 0
    channels_tps: float = 0.0
    skipped: str = ""  # why this quantization could not run here (one line)


def parse_quants(text: str) -> list[str]:
    """"none,8bit,4bit" as a list; a ValueError names a bad one."""
    quants = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in quants if q not in QUANTIZATIONS]
    if bad or not quants:
        raise ValueError(f"--quant {text!r}: use a comma-separated list of {', '.join(QUANTIZATIONS)}")
    return quants


async def measure_one(
    settings: Any, quantization: str, *, model: str | None, channels: int, reply_tokens: int
) -> QuantRow:
    """Load MODEL with `quantization` through the engine and measure it (see the docstring)."""
    row = QuantRow(quantization, channels=channels)
    wanted = replace(settings, quantization=quantization, max_batch=max(channels, 1))
    try:
        engine = make_engine(wanted, model=model)
        if not isinstance(engine, LocalEngine):
            raise EngineError("the quantization comparison measures the local engine (ENGINE=local)")
        t0 = time.perf_counter()
        await engine.start()
    except EngineError as exc:
        row.skipped = str(exc)
        return row
    row.load_s = time.perf_counter() - t0
    try:
        row.footprint_mb = engine.info.footprint_mb
        params = params_from_settings(wanted, max_new_tokens=reply_tokens, seed=1)
        await engine.complete(render_chat(SYSTEM, []), GenerationParams(max_new_tokens=2))
        row.one_stream_tps, _ = await single_stream(engine, params)
        row.channels_tps = (await aggregate(engine, channels, params)).tokens_per_s
    finally:
        await engine.close()
    return row


async def compare(
    settings: Any,
    quants: list[str],
    *,
    model: str | None = None,
    channels: int = 8,
    reply_tokens: int = 64,
) -> list[QuantRow]:
    """One row per quantization, measured one after the other in this process."""
    return [
        await measure_one(settings, q, model=model, channels=channels, reply_tokens=reply_tokens)
        for q in quants
    ]


def table_lines(rows: list[QuantRow], model: str) -> Iterator[str]:
    """The comparison as text: each figure and its ratio to the first row that ran."""
    base = next((r for r in rows if not r.skipped), None)
    yield f"quantization on the same model: {model} (ratios against {base.quantization if base else '-'})"
    n = rows[0].channels if rows else 0
    yield (
        f"{'quant':<6} {'load s':>12} {'footprint MB':>16} {'1 stream tok/s':>18} "
        f"{f'{n} channels tok/s':>20}"
    )

    def cell(value: float, ref: float, fmt: str) -> str:
        return f"{value:{fmt}} ({value / ref:.2f}x)" if ref > 0 else f"{value:{fmt}}"

    for r in rows:
        if r.skipped:
            yield f"{r.quantization:<6} not run: {r.skipped}"
            continue
        assert base is not None
        yield (
            f"{r.quantization:<6} {cell(r.load_s, base.load_s, '5.1f'):>12} "
            f"{cell(r.footprint_mb, base.footprint_mb, '6.0f'):>16} "
            f"{cell(r.one_stream_tps, base.one_stream_tps, '6.1f'):>18} "
            f"{cell(r.channels_tps, base.channels_tps, '6.1f'):>20}"
        )


def to_dicts(rows: list[QuantRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def main(settings: Any, quants: str, *, model: str | None, as_json: bool, tokens: int) -> int:
    """`hermes-bot bench --quant ...`: prints the comparison (or JSON); the exit status."""
    try:
        wanted = parse_quants(quants)
    except ValueError as exc:
        print(f"hermes-bot: {exc}", file=sys.stderr)
        return 2
    channels = max(settings.max_batch, 1)
    rows = asyncio.run(compare(settings, wanted, model=model, channels=channels, reply_tokens=tokens))
    if as_json:
        print(json.dumps(to_dicts(rows), indent=2))
    else:
        print("\n".join(table_lines(rows, model or settings.model)))
    return 0 if any(not r.skipped for r in rows) else 1
