"""`hermes-bot bench` through the real CLI on a tiny Llama (CPU): the table, the JSON, the rules.

Contents only, never timings: which concurrency levels ran, that tokens were generated, that
the cached prefix was reused, that a small window scales the history down and says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bot.benchmark import Level, MemorySeen, concurrency_levels, recommend
from bot.engine import plan_load

pytestmark = pytest.mark.slow

#: The dtype DTYPE=auto loads on this CPU (bf16 where it has native bf16, else fp32).
AUTO_DTYPE = plan_load("auto", "auto", cuda=False).dtype


def bench(env: dict[str, str], cwd: Path, *args: str, **settings: str):
    return subprocess.run(
        [sys.executable, "-m", "bot", "bench", "--tokens", "12", "--trials", "1", *args],
        env={**env, **settings},
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def test_bench_json_on_a_small_window(tiny_model: Path, cli_env, tmp_path: Path):
    run = bench(
        cli_env, tmp_path, "--json", MODEL=str(tiny_model), MAX_BATCH="4", CONTEXT_TOKENS="1024"
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(run.stdout)
    assert report["model"] == str(tiny_model)
    assert report["device"] == "cpu" and report["dtype"] == AUTO_DTYPE
    assert report["max_batch"] == 4 and report["torch_threads"] >= 1
    assert report["load_s"] > 0 and report["memory"]["weights_mb"] > 0
    assert report["memory"]["gpu_total_mb"] is None  # no GPU figures on the CPU
    assert [lv["channels"] for lv in report["levels"]] == [1, 2, 4]
    assert all(lv["tokens"] > 0 and lv["tokens_per_s"] > 0 for lv in report["levels"])
    assert report["single_stream_tokens"] > 0 and report["single_stream_tps"] > 0
    first = report["first_token"]
    assert first["window"] == 1024 and first["scaled"] is True
    assert first["target_tokens"] < 3500 and first["history_tokens"] <= 1024
    assert first["cached_ms"] is not None and first["cold_ms"] > 0
    assert first["reused_tokens"] > first["target_tokens"] // 2  # the channel's prefix was reused
    rec = report["recommendation"]
    assert 1 <= rec["max_batch"] <= 4 and rec["kv_cache_mb"] >= 0 and "KV room" in rec["reason"]


def test_bench_table(tiny_model: Path, cli_env, tmp_path: Path):
    run = bench(cli_env, tmp_path, MODEL=str(tiny_model), MAX_BATCH="2", KV_CACHE_MB="0")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith(f"hermes-bot bench: {tiny_model}\n")
    assert f"cpu, {AUTO_DTYPE}, quantization none, MAX_BATCH=2, KV_CACHE_MB=0" in out
    assert "single stream" in out and "tokens/s" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]  # one row per concurrency level
    assert all("█" in line for line in out.splitlines() if line.strip()[:1].isdigit())
    # the model's window (4096) holds the full ~3,500-token history: no scaling note
    assert "time to first token, " in out and "scaled down" not in out
    assert "cached prefix: off (KV_CACHE_MB=0)" in out
    assert "recommendation: MAX_BATCH=" in out
    assert "steps" in run.stderr or "step" in run.stderr  # the progress bar ran on stderr


def test_bench_refuses_the_openai_engine_in_one_line(tiny_model: Path, cli_env, tmp_path: Path):
    run = bench(cli_env, tmp_path, ENGINE="openai", TOKENIZER=str(tiny_model))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "measures the local engine" in run.stderr.strip().splitlines()[-1]


def test_concurrency_levels():
    assert concurrency_levels(1) == [1]
    assert concurrency_levels(8) == [1, 2, 4, 8]
    assert concurrency_levels(6) == [1, 2, 4, 6]
    assert concurrency_levels(16) == [1, 2, 4, 8, 16]


def test_recommendation_from_gpu_memory():
    mem = MemorySeen("cuda:0", 13_000, 2_000, 13_100, 15_000, 81_000)
    levels = [Level(1, 100, 1.0), Level(2, 190, 1.0), Level(4, 350, 1.0), Level(8, 360, 1.0)]
    per_token = 512 * 1024  # Llama-2-7B fp16: 0.5 MB of KV per token
    rec = recommend(mem, levels, per_token, 4096)
    assert rec.kv_cache_mb == int((0.9 * 81_000 - 15_000) // 256 * 256)  # 57,856 MB
    assert rec.max_batch == 4  # 4 channels reach 90% of the best; memory would hold 28
    assert "90% of 81,000 MB GPU memory" in rec.reason


def test_recommendation_is_capped_by_memory_and_notes_rising_throughput():
    mem = MemorySeen("cpu", 10, 500, ram_available_mb=8_192)
    levels = [Level(1, 10, 1.0), Level(2, 20, 1.0), Level(4, 40, 1.0)]
    rec = recommend(mem, levels, 1 << 19, 1024)  # 512 MB per full window: 8 fit
    assert rec.kv_cache_mb == 4096 and rec.max_batch == 4  # the most channels measured
    assert "still rising: try MAX_BATCH=8" in rec.reason
    tight = recommend(mem, levels, 2 << 20, 1024)  # 2 GB per window: only 2 fit
    assert tight.max_batch == 2
