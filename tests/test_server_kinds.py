"""Each OpenAI-compatible server kind is told apart at start and gets its own parameter names.

A small aiohttp server reports itself the way each real one does (vLLM's and llama-cpp-python's
`owned_by`, llama.cpp's `Server` header and `/props`, Ollama's `/api/version`) and records the
requests; the real llama.cpp servers are in tests/test_llamacpp_server.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import GenerationParams
from bot.engine.openai import OpenAIEngine
from bot.engine.servers import EXTRA_SETTINGS, KINDS, SlotMap
from bot.prompt import format_single

PROMPT = format_single("hi")
PARAMS = GenerationParams(max_new_tokens=4, temperature=0.0, top_k=7, repetition_penalty=1.3)


class Pretend:
    """Answers like one kind of server; records each completion request's body."""

    def __init__(self, kind: str, slots: int = 4) -> None:
        self.kind = kind
        self.slots = slots
        self.bodies: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None  # when set, each request waits for it

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        if self.kind == "llama.cpp":
            app.router.add_get("/props", self.props)
        if self.kind == "ollama":
            app.router.add_get("/api/version", lambda r: web.json_response({"version": "0.5.7"}))
        return app

    async def models(self, request: web.Request) -> web.Response:
        owner = {"vllm": "vllm", "llama.cpp": "llamacpp", "llama-cpp-python": "me"}
        entry = {"id": "m", "object": "model", "owned_by": owner.get(self.kind, "library")}
        if self.kind == "other":
            entry["owned_by"] = "someone"
        headers = {"Server": "llama.cpp"} if self.kind == "llama.cpp" else {}
        return web.json_response({"object": "list", "data": [entry]}, headers=headers)

    async def props(self, request: web.Request) -> web.Response:
        settings = {"n_ctx": 8192, "params": {"repeat_penalty": 1.0}}
        return web.json_response(
            {"default_generation_settings": settings, "total_slots": self.slots}
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        if self.gate is not None:
            await self.gate.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return resp


@pytest.fixture
async def pretend(tiny_model: Path) -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []
    engines: list[OpenAIEngine] = []

    async def start(kind: str, **kw: Any) -> tuple[Pretend, OpenAIEngine]:
        server = Pretend(kind, **kw)
        runner = web.AppRunner(server.app())
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        eng = OpenAIEngine(base_url=url, model="m", tokenizer=str(tiny_model), retries=0)
        engines.append(eng)
        await eng.start()
        return server, eng

    yield start
    for eng in engines:
        await eng.close()
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_each_kind_is_told_and_gets_its_own_names(pretend, kind, caplog):
    caplog.set_level(logging.WARNING, "bot.engine.openai")
    server, eng = await pretend(kind)
    assert eng.server.kind.name == kind
    assert await eng.complete(PROMPT, PARAMS) == "ok"
    body = server.bodies[-1]
    names = KINDS[kind].paths
    assert set(names) == set(EXTRA_SETTINGS)  # no setting is silently dropped by any kind
    for setting, path in names.items():
        node: Any = body
        for part in path.split("."):
            node = node[part]
        assert node == getattr(PARAMS, setting), (kind, path)
    if kind in ("llama.cpp", "llama-cpp-python"):
        assert "repetition_penalty" not in body and body["repeat_penalty"] == 1.3
        assert body["min_p"] == 0.0  # llama.cpp's default 0.05 would differ from the other engines
    if kind == "ollama":
        assert body["options"] == {"top_k": 7, "repeat_penalty": 1.3}
    if kind == "vllm":
        assert body["repetition_penalty"] == 1.3 and "repeat_penalty" not in body
    # one warning at start for the unknown kind, none for a known one
    warned = [r for r in caplog.records if "unknown server kind" in r.getMessage()]
    assert len(warned) == (kind == "other")
    assert eng.info.notes and eng.server.kind.label in eng.info.notes[0]


async def test_llama_cpp_server_gets_a_stable_slot_per_channel_and_its_prompt_cache(pretend):
    server, eng = await pretend("llama.cpp", slots=2)
    assert eng.server.slots == 2
    for channel in ("a", "b", "a", "b", "a"):
        await eng.generate(PROMPT, PARAMS, cache_key=channel).text_all()
    slots = [b["id_slot"] for b in server.bodies]
    assert slots[0] == slots[2] == slots[4] and slots[1] == slots[3] and slots[0] != slots[1]
    assert all(b["cache_prompt"] is True for b in server.bodies)


async def test_top_k_off_is_said_in_each_dialect(pretend):
    off = GenerationParams(max_new_tokens=4, top_k=0)
    server, eng = await pretend("llama.cpp")
    await eng.complete(PROMPT, off)
    assert server.bodies[-1]["top_k"] == 0  # llama.cpp's own default would be 40
    server, eng = await pretend("vllm")
    await eng.complete(PROMPT, off)
    assert "top_k" not in server.bodies[-1]  # vLLM: absent is off


def test_slot_map_keeps_a_channel_on_its_slot_and_shares_when_busy():
    slots = SlotMap(2)
    a = slots.acquire("a")
    b = slots.acquire("b")
    assert {a, b} == {0, 1}
    assert slots.acquire("c") is None  # both busy: the server picks
    slots.release(a)
    assert slots.acquire("a") == a  # its own slot again
    slots.release(a)
    slots.release(b)
    c = slots.acquire("c")  # a new channel takes the least recently used slot
    assert c == b
    assert slots.acquire("a") == a
    assert SlotMap(0).acquire("a") is None
