"""The OpenAI-compatible engine: against a real `transformers serve`, and a scripted server.

The real server (a subprocess on 127.0.0.1 serving the tiny model folder) checks streaming, stop
strings and surviving a restart. A small aiohttp server scripts what a real one does only on a
bad day (503s, hangs, a stream cut mid-reply, a strict schema) so those paths run in a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import EngineError, GenerationParams, LocalEngine, RequestState, make_engine
from bot.engine.openai import OpenAIEngine
from bot.prompt import format_single, stop_strings
from tests.fake_discord.common import PATIENCE

PROMPT = format_single("hello there, how are you?")
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server


class Scripted:
    """Serves /v1/completions; `script` says how each next request goes (default: fine)."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.pieces = ["Hel", "lo", " there", ",", " friend", "!"]
        self.hung_up = asyncio.Event()
        #: a "hang" lasts until the test is over (the engine gives up on its own read timeout)
        self.release = asyncio.Event()
        self.url = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        how = self.script.pop(0) if self.script else "ok"
        if how in ("500", "503", "429"):
            return web.Response(status=int(how), text="busy, try later")
        if how == "400":
            return web.json_response({"error": {"message": "model not found"}}, status=404)
        if how == "strict" and "top_k" in body:
            return web.json_response(
                {"detail": "Unexpected fields in the request: {'top_k'}"}, status=422
            )
        if how == "hang":
            await self.release.wait()  # no bytes until teardown: only the read timeout ends it
            return web.Response(status=499)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if how == "empty":
            return resp  # headers, then nothing: the stream ends before any text
        try:
            for i, piece in enumerate(self.pieces):
                if how == "cut" and i == 2:
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if how == "slow":
                    await asyncio.sleep(0.05)
                chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if how == "no-end":
                return resp  # the stream just ends: no finish reason, no [DONE]
            usage = {
                "prompt_tokens": 17,
                "completion_tokens": len(self.pieces),
                "prompt_tokens_details": {"cached_tokens": 12},
            }
            final = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            self.hung_up.set()
        return resp


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    app = web.Application()
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "hermes"}]}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # the OS picks the port: no race for it
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def remote(url: str, tokenizer: Path, **kw: Any) -> AsyncIterator[OpenAIEngine]:
    """A started engine for the server at `url`, closed after."""
    # a generous read timeout: a busy machine must not turn a slow reply into a retry (the
    # retry counts are asserted); only the "hang" case sets a short one, on purpose
    opts = {"retries": 3, "backoff": 0.01, "max_backoff": 0.05, "read_timeout": 60.0} | kw
    eng = OpenAIEngine(base_url=url, api_key="k", model="hermes", tokenizer=str(tokenizer), **opts)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def test_sends_the_alpaca_prompt_and_parameters(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        params = GenerationParams(
            max_new_tokens=50,
            temperature=0.8,
            top_p=0.9,
            top_k=40,
            repetition_penalty=1.1,
            stop=tuple(stop_strings(["Bob"])),
            seed=7,
        )
        gen = eng.generate(PROMPT, params, cache_key="1")
        pieces = [p async for p in gen]
        assert "".join(pieces) == "Hello there, friend!"
        assert len(pieces) > 1
        body = scripted.requests[0]
        assert body["prompt"] == PROMPT  # verbatim: no chat template
        assert body["stream"] is True and body["model"] == "hermes"
        assert body["max_tokens"] == 50 and body["temperature"] == 0.8 and body["top_p"] == 0.9
        assert body["top_k"] == 40 and body["repetition_penalty"] == 1.1 and body["seed"] == 7
        assert body["stop"] == list(params.stop)
        assert scripted.headers[0]["Authorization"] == "Bearer k"
        assert scripted.headers[0]["X-Hermes-Channel"] == "1"  # for sticky load balancing
        s = gen.stats
        assert s.finish_reason == "length"
        assert (s.prompt_tokens, s.new_tokens, s.reused_tokens) == (17, 6, 12)  # from usage
        assert s.time_to_first_token is not None and s.queue_wait >= 0
        assert (
            eng.count_tokens("hello there")
            == eng.tokenizer("hello there", add_special_tokens=False).input_ids.__len__()
        )


async def test_stop_strings_are_applied_locally_too(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        gen = eng.generate(PROMPT, replace(GREEDY, stop=("friend",)))
        assert gen.state is RequestState.QUEUED and eng.queue_length == 1
        assert await gen.text_all() == "Hello there, "
        assert gen.stats.finish_reason == "stop" and gen.state is RequestState.FINISHED
        assert eng.queue_length == 0


@pytest.mark.parametrize("failure", ["503", "500", "429", "hang", "empty"])
async def test_failures_before_the_first_token_are_retried(
    scripted: Scripted, tiny_model: Path, failure: str
):
    # a hang is ended by the read timeout; the good third attempt must answer within it
    async with remote(scripted.url, tiny_model, read_timeout=2.0 if failure == "hang" else 60.0) as eng:
        scripted.script = [failure, failure]
        assert await eng.complete(PROMPT, GREEDY) == "Hello there, friend!"
        assert len(scripted.requests) == 3


async def test_persistent_failure_becomes_an_engine_error(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        scripted.script = ["503"] * 10
        gen = eng.generate(PROMPT, GREEDY)
        with pytest.raises(EngineError, match="failed 4 times"):
            await gen.text_all()
        assert gen.stats.finish_reason == "error"
        assert len(scripted.requests) == 4
        scripted.script = []
        assert await eng.complete(PROMPT, GREEDY)  # and the next reply works again


async def test_unreachable_server_is_an_engine_error(tiny_model: Path):
    async with remote(f"http://127.0.0.1:{free_port()}/v1", tiny_model, retries=2) as eng:
        with pytest.raises(EngineError, match="failed 3 times"):
            await eng.complete(PROMPT, GREEDY)


@pytest.mark.parametrize("failure", ["cut", "no-end"])
async def test_a_stream_cut_after_text_fails_without_retry(
    scripted: Scripted, tiny_model: Path, failure: str
):
    async with remote(scripted.url, tiny_model) as eng:
        scripted.script = [failure]
        gen = eng.generate(PROMPT, GREEDY)
        seen: list[str] = []
        with pytest.raises(EngineError, match="mid-reply|broke off"):
            async for piece in gen:
                seen.append(piece)
        assert "".join(seen) == ("Hello" if failure == "cut" else "Hello there, friend!")
        assert len(scripted.requests) == 1  # never retried once the user saw text


async def test_client_errors_are_not_retried(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        scripted.script = ["400"]
        with pytest.raises(EngineError, match="HTTP 404"):
            await eng.complete(PROMPT, GREEDY)
        assert len(scripted.requests) == 1


async def test_strict_server_gets_standard_fields_only(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        scripted.script = ["strict", "strict"]
        params = replace(GREEDY, top_k=40, temperature=0.7)
        assert await eng.complete(PROMPT, params) == "Hello there, friend!"
        assert "top_k" in scripted.requests[0] and "top_k" not in scripted.requests[1]
        assert await eng.complete(PROMPT, params)
        assert "top_k" not in scripted.requests[2]  # remembered


async def test_cancel_hangs_up(scripted: Scripted, tiny_model: Path):
    async with remote(scripted.url, tiny_model) as eng:
        scripted.pieces = ["x"] * 200
        scripted.script = ["slow"]
        gen = eng.generate(PROMPT, GREEDY)
        async for _ in gen:
            gen.cancel()
        assert gen.stats.finish_reason == "cancelled"
        await asyncio.wait_for(scripted.hung_up.wait(), 60)
        assert len(gen.text) < 200


def test_make_engine_picks_openai(settings_factory, tiny_model: Path):
    s = settings_factory(
        ENGINE="openai",
        OPENAI_BASE_URL="http://10.0.0.5:8000/v1",
        OPENAI_MODEL="NousResearch/Nous-Hermes-llama-2-7b",
        TOKENIZER=str(tiny_model),
    )
    eng = make_engine(s)
    assert isinstance(eng, OpenAIEngine)
    assert eng.model == "NousResearch/Nous-Hermes-llama-2-7b"
    assert eng.base_url == "http://10.0.0.5:8000/v1"
    assert eng.tokenizer_path == str(tiny_model)


# --------------------------------------------------------------------------------------------
# A real `transformers serve`


class Served:
    """`transformers serve <tiny model>` on 127.0.0.1, restartable on the same port."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log = model, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
        env = os.environ | {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            time.sleep(0.05)
        pytest.fail(f"transformers serve did not come up: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    pytest.importorskip("fastapi", reason="needs transformers[serving]")
    pytest.importorskip("uvicorn", reason="needs transformers[serving]")
    server = Served(tiny_model, tmp_path_factory.mktemp("serve") / "serve.log")
    server.start()
    try:
        server.wait()
        yield server
    finally:
        server.stop()


class RetryLog(logging.Handler):
    """Sets `seen` when the engine logs that it will retry (on the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retry" in record.getMessage():
            self.seen.set()


@contextlib.asynccontextmanager
async def real(served: Served, **kw: Any) -> AsyncIterator[OpenAIEngine]:
    """A started engine for the real server, closed after."""
    opts = {"retries": 40, "backoff": 0.2, "max_backoff": 1.0, "read_timeout": 60.0} | kw
    eng = OpenAIEngine(
        base_url=served.url, model=str(served.model), tokenizer=str(served.model), **opts
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


async def local_greedy(model: Path, prompt: str, params: GenerationParams) -> str:
    eng = LocalEngine(model, dtype="float32", device_map="none", max_batch=1)
    await eng.start()
    try:
        return await eng.complete(prompt, params)
    finally:
        await eng.close()


@pytest.mark.slow
async def test_real_server_streams_the_same_greedy_text(served: Served):
    async with real(served) as eng:
        gen = eng.generate(PROMPT, GREEDY)
        pieces = [p async for p in gen]
        assert len(pieces) > 1
        assert "".join(pieces) == gen.text != ""
        assert gen.text == await local_greedy(served.model, PROMPT, GREEDY)
        assert gen.stats.finish_reason in ("length", "eos")
        assert gen.stats.new_tokens > 0 and gen.stats.prompt_tokens > 0
        assert not eng.send_extras  # transformers serve is strict: top_k etc. were dropped


@pytest.mark.slow
async def test_real_server_honours_stop_strings(served: Served):
    async with real(served) as eng:
        params = replace(GREEDY, max_new_tokens=40)
        full = await eng.complete(PROMPT, params)
        stop = next(
            (
                full[i : i + 3]
                for i in range(len(full) // 2, len(full) - 3)
                if full[i : i + 3].isprintable()
                and "\ufffd" not in full[i : i + 3]
                and full.find(full[i : i + 3]) > 0
            ),
            None,
        )
        if stop is None:
            pytest.skip("the tiny model's output has no printable 3-character run")
        gen = eng.generate(PROMPT, replace(params, stop=(stop,)))
        assert await gen.text_all() == full[: full.find(stop)]
        assert gen.stats.finish_reason == "stop"


@pytest.mark.slow
async def test_real_server_restart_mid_conversation(served: Served):
    # enough retries (at most 1 s apart) to outlast a restart of `transformers serve` on a busy
    # machine: the test waits for the server, it does not bet on how fast it starts
    async with real(served, retries=300) as eng:
        first = await eng.complete(PROMPT, GREEDY)
        second_prompt = f"{PROMPT}{first}\n\n### Instruction:\nAlice: and then?\n\n### Response:\n"
        before = await eng.complete(second_prompt, GREEDY)
        served.stop()  # the server goes away between two messages of the conversation
        retries = RetryLog()
        logging.getLogger("bot.engine.openai").addHandler(retries)
        try:
            gen = eng.generate(second_prompt, GREEDY)
            await asyncio.wait_for(retries.seen.wait(), PATIENCE)  # it failed and will retry
            served.start()  # and comes back while the bot retries with backoff
            after = await gen.text_all()
        finally:
            logging.getLogger("bot.engine.openai").removeHandler(retries)
        assert after == before
        assert await eng.complete(PROMPT, GREEDY) == first
