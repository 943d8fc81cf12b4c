"""The bot through a real llama.cpp server: `python -m llama_cpp.server` on the SmolLM2 GGUF.

The server is a subprocess on 127.0.0.1, started and stopped here; a small recording proxy in
front of it keeps every request body exactly as the bot sent it, so the test sees what reached
the server (`REPETITION_PENALTY=1.3` as llama.cpp's `repeat_penalty`, 1.3). The bot runs on the
fake Discord with `ENGINE=openai`; it must tell the server kind at start, answer, and store
exactly what it posted, with no header fragment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bot.prompt import is_header_line
from tests.bot_harness import bot_settings, running_bot
from tests.llamacpp_helpers import need_llamacpp
from tests.world import World

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free port; yields its base URL (without /v1)."""
    need_llamacpp()
    pytest.importorskip("sse_starlette", reason="llama-cpp-python's [server] extra is missing")
    model = smollm2_gguf
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "2048"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)
                break
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Recorder:
    """A pass-through proxy that records each request's method, path and JSON body."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.requests: list[tuple[str, str, Any]] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        data = await request.read()
        body: Any = None
        if data:
            with contextlib.suppress(ValueError):
                body = await request.json()
        self.requests.append((request.method, request.path, body))
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with self.session.request(
            request.method, f"{self.upstream}{request.path_qs}", data=data or None, headers=headers
        ) as up:
            resp = web.StreamResponse(status=up.status)
            for key in ("Content-Type", "Server"):
                if key in up.headers:
                    resp.headers[key] = up.headers[key]
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    def completions(self) -> list[dict[str, Any]]:
        return [b for m, p, b in self.requests if m == "POST" and p.endswith("completions")]


@pytest_asyncio.fixture
async def recorder(llama_server: str) -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder(llama_server)
    rec.session = aiohttp.ClientSession()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield rec, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()
        await rec.session.close()


def fragment_free(text: str) -> bool:
    """No header line, no line of only `#`/quote marks, no dangling header start."""
    for line in text.splitlines():
        bare = line.strip()
        if is_header_line(line) or (bare and set(bare) <= set("#> ")):
            return False
    return not text.rstrip().endswith(("#", "### Instr", "### Resp"))


@pytest.mark.parametrize("prompt_format", ["chat_template", "server"])
async def test_the_bot_through_llama_cpp_python_server(
    world: World,
    tmp_path: Path,
    recorder: tuple[Recorder, str],
    smollm2_hf: Path,
    prompt_format: str,
) -> None:
    """chat_template: the bot renders SmolLM2's template and sends text to /v1/completions;
    server: role messages to /v1/chat/completions, the server applies the template."""
    rec, url = recorder
    settings = bot_settings(
        tmp_path,
        "smollm2",
        ENGINE="openai",
        OPENAI_BASE_URL=url,
        OPENAI_MODEL="smollm2",
        TOKENIZER=str(smollm2_hf),
        REPETITION_PENALTY="1.3",
        PROMPT_FORMAT=prompt_format,
        MAX_NEW_TOKENS="32",
        CONTEXT_TOKENS="2048",
        REPLY_TIMEOUT="300",
    )
    fake = world.fake

    def bot_posts() -> list[Any]:
        return [
            m for m in fake.channel_messages(world.general.id) if m.author.id == fake.bot_user.id
        ]

    async with running_bot(fake, settings) as bot:
        assert bot.engine.server.kind.name == "llama-cpp-python"  # told from owned_by "me"
        for question in ("What is the capital of France?", "And what is 2 + 2?"):
            asked = await fake.user_message(
                world.general.id, world.alice, f"{fake.bot_user.mention} {question}"
            )
            await fake.wait_for(
                lambda asked=asked: any(m.reference_id == asked.id for m in bot_posts()),
                timeout=300,
            )
            await fake.wait_for(lambda: bot.conv.pending == 0 and not bot.reply_tasks, timeout=300)
        posted = bot_posts()
        assert len(posted) == 2 and all(m.content.strip() for m in posted)
        stored = [
            t for t in await bot.memory.turns.history(world.general.id) if t.role == "assistant"
        ]
        assert [t.content for t in stored] == [m.content for m in posted]  # stored = posted
        assert all(fragment_free(t.content) for t in stored), [t.content for t in stored]
    sent = rec.completions()
    assert len(sent) >= 2
    assert all(("messages" in b) == (prompt_format == "server") for b in sent)
    for body in sent:  # the penalty reached the server under its own name, as set
        assert body["repeat_penalty"] == 1.3 and "repetition_penalty" not in body
        assert body["temperature"] == 0.0
