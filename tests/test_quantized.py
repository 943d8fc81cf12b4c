"""QUANTIZATION=8bit|4bit through bitsandbytes wherever it has a backend (the CPU here).

The whole engine on quantized weights of a tiny Llama: greedy replies of one channel alone and
of the same channel inside a batch of four agree, the prefix cache and cancellation work; the
loader asks bitsandbytes which devices it can run on and says in one line why not; a load
reaches for no network and prints no hub-kernel noise; doctor shows quantization and footprint.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from bot.engine import EngineError, GenerationParams, LocalEngine, plan_load
from bot.engine.quantize import (
    BNB_MIN_VERSION,
    QuantizationError,
    check_device,
    installed_version,
    refusal,
    registered_devices,
)
from bot.prompt import format_single

pytest.importorskip("bitsandbytes", reason="the quantized paths need bitsandbytes (dev extra)")

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
PROMPTS = [
    format_single(text)
    for text in (
        "hello there, how are you?",
        "tell me about the weather",
        "what music do you like?",
        "print('hi') in python please",
    )
]
#: The hub-kernel notice bitsandbytes logs on AVX512-BF16 CPUs when it cannot fetch its kernel.
HUB_NOISE = ("kernels-community", "gemm_4bit_forward")


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose Linear shapes bitsandbytes' blockwise (64) quantization accepts."""
    from tests.tiny import make_model

    return make_model(tmp_path_factory.mktemp("quant"), hidden=64, heads=4)


def cpu_can(quantization: str) -> bool:
    return "cpu" in registered_devices(quantization)


# ---- where bitsandbytes can run, in one line ---------------------------------------------


def test_refusals_name_the_version_needed():
    missing = refusal("4bit", "cpu", None, set())
    assert "needs bitsandbytes" in missing and f">={BNB_MIN_VERSION}" in missing
    assert "QUANTIZATION=none" in missing
    old = refusal("8bit", "cpu", "0.45.5", {"cuda"})
    assert "0.45.5 is too old for cpu" in old and f"bitsandbytes>={BNB_MIN_VERSION}" in old
    none = refusal("4bit", "mps", "0.50.2", {"cpu"})
    assert "has no backend for mps" in none and "it can run on: cpu" in none
    assert refusal("4bit", "cpu", "0.50.2", {"cpu"}) is None
    assert all("\n" not in line for line in (missing, old, none))


def test_the_installed_bitsandbytes_reports_the_cpu():
    version = installed_version()
    assert version is not None
    for q in ("4bit", "8bit"):
        devices = registered_devices(q)
        assert "cpu" in devices  # libbitsandbytes_cpu or the default backend registered it
        assert ("cuda" in devices) == torch.cuda.is_available()
        check_device(q, "cpu")  # no refusal
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationError, match="has no backend for cuda"):
            check_device("4bit", "cuda")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_plan_on_the_cpu(quantization: str):
    plan = plan_load("bfloat16", "auto", quantization, cuda=False)
    config = plan.kwargs["quantization_config"]
    assert plan.device_map == "cpu" and plan.kwargs["device_map"] == "cpu"
    if quantization == "4bit":
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == torch.bfloat16  # from DTYPE
        assert plan_load("float32", "cpu", "4bit", cuda=False).kwargs[
            "quantization_config"
        ].bnb_4bit_compute_dtype == torch.float32
    else:
        assert config.load_in_8bit


def test_plan_for_a_gpu_bitsandbytes_cannot_reach():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EngineError, match="QUANTIZATION=4bit: bitsandbytes .* no backend for cuda"):
        plan_load(quantization="4bit", cuda=True)  # as if torch saw a GPU bitsandbytes cannot


# ---- the whole engine on quantized weights -----------------------------------------------


@pytest.fixture(params=["4bit", "8bit"])
async def quant_engine(request, quant_model: Path) -> AsyncIterator[LocalEngine]:
    if not cpu_can(request.param):
        pytest.skip(f"bitsandbytes has no CPU backend for {request.param} here")
    eng = LocalEngine(
        quant_model, dtype="float32", device_map="cpu", quantization=request.param,
        max_batch=8, kv_cache_mb=64,
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def test_the_weights_are_quantized(quant_engine: LocalEngine):
    import bitsandbytes as bnb

    kind = bnb.nn.Linear4bit if quant_engine.plan.quantization == "4bit" else bnb.nn.Linear8bitLt
    layers = [m for m in quant_engine.model.modules() if isinstance(m, kind)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the two layers
    assert quant_engine.info.quantization == quant_engine.plan.quantization
    assert quant_engine.info.footprint_mb > 0
    assert f"quantization {quant_engine.plan.quantization}" in quant_engine.info.describe()


async def test_alone_and_in_a_batch_of_four_agree(quant_engine: LocalEngine):
    from tests.test_batching import MostAtOnce

    alone = [await quant_engine.generate(p, GREEDY).text_all() for p in PROMPTS]
    most = MostAtOnce(quant_engine)
    together = await asyncio.gather(
        *(quant_engine.generate(p, GREEDY).text_all() for p in PROMPTS)
    )
    assert list(together) == alone
    assert most.most > 1  # they really ran together
    assert any(text.strip() for text in alone)


async def test_prefix_cache_reuses_a_channels_prompt(quant_engine: LocalEngine):
    first = quant_engine.generate(PROMPTS[0], GREEDY, cache_key="q-chan")
    reply = await first.text_all()
    follow = PROMPTS[0] + reply + "\n\n" + format_single("and then?")
    cold = await quant_engine.generate(follow, GREEDY).text_all()
    warm_gen = quant_engine.generate(follow, GREEDY, cache_key="q-chan")
    assert await warm_gen.text_all() == cold
    assert warm_gen.stats.reused_tokens > 0


async def test_cancel_one_of_a_batch(quant_engine: LocalEngine):
    long = GenerationParams(max_new_tokens=64, temperature=0.0, repetition_penalty=1.0)
    expected = [await quant_engine.generate(p, GREEDY).text_all() for p in PROMPTS[1:]]
    victim = quant_engine.generate(PROMPTS[0], long)
    gens = [quant_engine.generate(p, GREEDY) for p in PROMPTS[1:]]

    async def cancel_after_first_piece() -> None:
        async for _ in victim:
            victim.cancel()

    _, *texts = await asyncio.gather(cancel_after_first_piece(), *(g.text_all() for g in gens))
    assert texts == expected
    assert victim.stats.finish_reason == "cancelled" and victim.stats.new_tokens < 64


# ---- no network, no hub noise, footprint shown -------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.seen.append(self.path)
        self.send_response(503)
        self.end_headers()

    do_HEAD = do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[tuple[str, list[str]]]:
    """A stand-in hub endpoint that records every request it gets (and answers none)."""
    seen: list[str] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _env(endpoint: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return {**env, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": endpoint, **extra}


@pytest.mark.slow
def test_doctor_loads_quantized_without_network_or_noise(
    hub: tuple[str, list[str]], quant_model: Path, tmp_path: Path
):
    endpoint, seen = hub
    env = _env(
        endpoint, QUANTIZATION="4bit", MODEL=str(quant_model), DB_PATH=str(tmp_path / "d.db"),
        DTYPE="float32", DEVICE_MAP="cpu",
    )
    done = subprocess.run(
        [sys.executable, "-m", "bot", "doctor", "--skip-token"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    out = done.stdout + done.stderr
    assert "quantization 4bit" in done.stdout and "footprint" in done.stdout, out
    assert not any(noise in out for noise in HUB_NOISE), out
    assert "model" in out and "loaded in" in done.stdout
    assert seen == []  # not one request reached the hub


def test_hub_kernel_lookup_stays_local(hub: tuple[str, list[str]], tmp_path: Path):
    """What bitsandbytes does on an AVX512-BF16 CPU, inside the loader's guard: the `kernels`
    lookup answers from the (empty) local cache and sends no request."""
    pytest.importorskip("kernels", reason="only the `kernels` package does a hub lookup")
    endpoint, seen = hub
    script = (
        "from bot.engine.quantize import hub_kernels_local_only\n"
        "from kernels import get_kernel\n"
        "with hub_kernels_local_only():\n"
        "    try:\n"
        "        get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
        "    except Exception as exc:\n"
        "        print('local only:', type(exc).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(endpoint, HF_HOME=str(tmp_path / "hf")), cwd=tmp_path,
        capture_output=True, text=True, timeout=300,
    )
    assert "local only:" in done.stdout, done.stdout + done.stderr
    assert seen == []


# ---- the bench's comparison --------------------------------------------------------------


async def test_bench_compares_quantizations_on_one_model(quant_model: Path, settings_factory):
    from bot.bench_quant import compare, parse_quants, table_lines

    settings = settings_factory(MODEL=str(quant_model), DTYPE="float32", DEVICE_MAP="none")
    rows = await compare(settings, parse_quants("none,8bit,4bit"), channels=2, reply_tokens=4)
    assert [r.quantization for r in rows] == ["none", "8bit", "4bit"]
    assert all(not r.skipped and r.load_s > 0 and r.one_stream_tps > 0 for r in rows)
    assert all(r.channels == 2 and r.channels_tps > 0 for r in rows)
    none, eight, four = (r.footprint_mb for r in rows)
    assert four < eight < none  # the Linear weights shrink
    lines = list(table_lines(rows, "tiny"))
    assert "ratios against none" in lines[0] and "2 channels tok/s" in lines[1]
    assert lines[2].startswith("none") and "(1.00x)" in lines[2]
    with pytest.raises(ValueError, match="--quant '3bit'"):
        parse_quants("3bit")
