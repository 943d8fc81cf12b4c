"""Images (VISION): with ENGINE=openai and PROMPT_FORMAT=server an image a member attaches
reaches the model server as an image part of their chat message; other setups name it only,
and VISION with a format that cannot carry images is one clear line at start."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import EngineError
from bot.store.images import Image, sniff
from tests.bot_harness import bot_settings, running_bot
from tests.fake_discord import FakeFile
from tests.test_admin import bot_messages, settle
from tests.world import World

pytestmark = pytest.mark.slow

#: A real 1x1 PNG (signature, IHDR, IDAT, IEND).
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class ChatServer:
    """An OpenAI-compatible chat endpoint that records each request and streams one answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.url = ""

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("A small", " square."):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(done)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def chat_server() -> AsyncIterator[ChatServer]:
    server = ChatServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "eyes"}]}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


def vision_env(server: ChatServer, tiny_model: Path, **env: str) -> dict[str, str]:
    return {
        "ENGINE": "openai",
        "OPENAI_BASE_URL": server.url,
        "OPENAI_MODEL": "eyes",
        "TOKENIZER": str(tiny_model),
        "PROMPT_FORMAT": "server",
        "VISION": "true",
        **env,
    }


def test_images_are_told_by_their_bytes() -> None:
    assert sniff(PNG) == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "image/jpeg"
    assert sniff(b"GIF89a...") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"not an image at all") is None
    assert Image("image/png", PNG).data_url() == (
        "data:image/png;base64," + base64.b64encode(PNG).decode()
    )


async def test_an_image_reaches_the_server_as_an_image_part(
    world: World, tmp_path: Path, tiny_model: Path, chat_server: ChatServer
) -> None:
    w = world
    settings = bot_settings(tmp_path, "eyes", **vision_env(chat_server, tiny_model, IMAGE_KB="1"))
    big = PNG + b"\x00" * 2048  # a PNG over IMAGE_KB: named, not sent
    async with running_bot(w.fake, settings) as bot:
        await w.fake.user_message(
            w.general.id,
            w.alice,
            f"{w.fake.bot_user.mention} what is in this picture?",
            attachments=[
                FakeFile("dot.png", PNG, "image/png"),
                FakeFile("fake.png", b"just text, named like a picture", "image/png"),
                FakeFile("huge.png", big, "image/png"),
            ],
        )
        await settle(w, bot, w.general.id, 1)
        assert bot_messages(w.fake, w.general.id)[0].content == "A small square."
        (body,) = chat_server.requests
        user = body["messages"][-1]
        assert user["role"] == "user"
        text, *images = user["content"]
        assert text["type"] == "text" and "what is in this picture?" in text["text"]
        for name in ("dot.png", "fake.png", "huge.png"):  # every attachment is named
            assert name in text["text"]
        assert images == [  # only the real image within the size cap is sent
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()},
            }
        ]
        # the next message sees the picture again: it is in the window, kept with its turn
        await w.fake.user_message(w.general.id, w.alice, f"{w.fake.bot_user.mention} colour?")
        await settle(w, bot, w.general.id, 2)
        later = chat_server.requests[-1]["messages"]
        parts = [p for m in later if isinstance(m["content"], list) for p in m["content"]]
        assert [p["type"] for p in parts].count("image_url") == 1
        assert later[-1]["content"].endswith("colour?")  # a plain message stays plain text


async def test_vision_off_names_images_only(
    world: World, tmp_path: Path, tiny_model: Path, chat_server: ChatServer
) -> None:
    w = world
    env = vision_env(chat_server, tiny_model, VISION="false")
    async with running_bot(w.fake, bot_settings(tmp_path, "eyes", **env)) as bot:
        await w.fake.user_message(
            w.general.id,
            w.alice,
            f"{w.fake.bot_user.mention} look",
            attachments=[FakeFile("dot.png", PNG, "image/png")],
        )
        await settle(w, bot, w.general.id, 1)
        content = chat_server.requests[-1]["messages"][-1]["content"]
        assert isinstance(content, str) and "[attached: dot.png]" in content


@pytest.mark.parametrize("prompt_format", ["auto", "alpaca"])
async def test_vision_with_a_text_format_is_one_clear_error_at_start(
    world: World,
    tmp_path: Path,
    tiny_model: Path,
    chat_server: ChatServer,
    prompt_format: str,
) -> None:
    env = vision_env(chat_server, tiny_model, PROMPT_FORMAT=prompt_format)
    with pytest.raises(EngineError) as failed:
        async with running_bot(world.fake, bot_settings(tmp_path, "eyes", **env)):
            pass
    message = str(failed.value)
    assert "VISION=true" in message and "PROMPT_FORMAT=server" in message
    assert "\n" not in message
