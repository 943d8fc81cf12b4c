"""Text attachments are read into the conversation, through the real bot and the fake Discord.

A long paste arrives as `message.txt`; code as `.py`; images are binary. Each is posted by a
user through the fake's gateway, the real bot downloads what it should from the fake's file
server, and we read back what memory stored and what the engine was asked.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.discord.attachments import fenced, is_text
from tests.bot_harness import ScriptedEngine, running_bot
from tests.fake_discord import PATIENCE, FakeFile
from tests.world import World

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


async def ask(w: World, text: str, files: list[FakeFile]):
    return await w.fake.user_message(
        w.general.id, w.alice, f"{w.fake.bot_user.mention} {text}", attachments=files
    )


async def replied(w: World, bot, count: int) -> None:
    await w.fake.wait_for(
        lambda: (
            len(
                [
                    m
                    for m in w.fake.channel_messages(w.general.id)
                    if m.author.id == w.fake.bot_user.id
                ]
            )
            >= count
            and bot.conv.pending == 0
        ),
    )


async def stored(bot, message_id: int) -> str:
    turn = await bot.memory.turns.for_message(message_id)
    assert turn is not None
    return turn.content


async def test_text_attachments_are_read_binary_ones_named(world: World, tmp_path: Path):
    w = world
    engine = ScriptedEngine(["Looks fine.", "ok", "ok"])
    paste = "Why does this loop never end?\nwhile True:\n    pass\n" + "x = 1\n" * 50
    code = 'print("```")  # a fence inside the file\n### Response: not a header in the prompt\n'
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        msg = await ask(
            w,
            "see attached",
            [
                FakeFile.text("message.txt", paste),
                FakeFile.text("bug.py", code, "application/octet-stream"),
                FakeFile("cat.png", PNG, "image/png"),
            ],
        )
        await replied(w, bot, 1)
        text = await stored(bot, msg.id)
        assert text.startswith("see attached\n[attached: message.txt]\n```txt\nWhy does")
        assert "x = 1\n" * 50 in text
        # a fence longer than the backtick run inside the file keeps the file in one block
        assert '[attached: bug.py]\n````py\nprint("```")' in text
        assert text.endswith("[attached: cat.png]")
        prompt = engine.prompts[0]
        assert "Why does this loop never end?" in prompt  # the model saw the question
        assert "\n### Response: not a header" not in prompt  # defused like any message text
        fetched = [d.path.rsplit("/", 1)[-1] for d in w.fake.downloads]
        assert fetched == ["message.txt", "bug.py"]  # the image was never downloaded


async def test_large_and_failed_downloads_are_noted_never_fatal(world: World, tmp_path: Path):
    w = world
    engine = ScriptedEngine(["ok", "ok"])
    settings = w.settings(tmp_path, ATTACHMENT_KB="1")
    async with running_bot(w.fake, settings, engine=engine) as bot:
        big = await ask(w, "too big", [FakeFile.text("log.txt", "line\n" * 2000)])
        await replied(w, bot, 1)
        assert (
            await stored(bot, big.id) == "too big\n[attached: log.txt (10 KB, too large to read)]"
        )
        assert w.fake.downloads == []  # its size alone said so: nothing was fetched

        # the file server answers 404 to the next download: noted in the turn, reply still comes
        w.fake.inject("GET", r"(/media)?/attachments/.*", 404)
        msg = await ask(w, "read this", [FakeFile.text("a.txt", "hello")])
        await replied(w, bot, 2)
        assert await stored(bot, msg.id) == "read this\n[attached: a.txt (could not be downloaded)]"
        assert "read this" in engine.prompts[1]


async def stored_eventually(bot, message_id: int, predicate) -> str:
    """The stored text once `predicate` holds (an edit is stored by its own event task)."""
    deadline = asyncio.get_running_loop().time() + PATIENCE
    while asyncio.get_running_loop().time() < deadline:
        text = await stored(bot, message_id)
        if predicate(text):
            return text
        await asyncio.sleep(0.05)
    return await stored(bot, message_id)


async def test_an_edit_keeps_the_attachments(world: World, tmp_path: Path):
    w = world
    engine = ScriptedEngine(["ok"])
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        msg = await ask(
            w, "first words", [FakeFile.text("q.txt", "the question"), FakeFile("p.png", PNG)]
        )
        await replied(w, bot, 1)
        await w.fake.edit_user_message(msg, f"{w.fake.bot_user.mention} better words")
        text = await stored_eventually(bot, msg.id, lambda t: t.startswith("better"))
        assert text.startswith("better words")
        assert "[attached: q.txt]\n```txt\nthe question\n```" in text
        assert text.endswith("[attached: p.png]")


def test_what_counts_as_text():
    class A:
        def __init__(self, filename: str, content_type: str | None) -> None:
            self.filename, self.content_type = filename, content_type

    assert is_text(A("message.txt", "text/plain; charset=utf-8"))
    assert is_text(A("x.bin", "application/json"))
    assert is_text(A("main.rs", "application/octet-stream"))
    assert is_text(A("Dockerfile", None))
    assert not is_text(A("cat.png", "image/png"))
    assert not is_text(A("song.mp3", None))
    assert fenced("a.md", "``` inside") == "[attached: a.md]\n````md\n``` inside\n````"


async def test_a_slow_attachment_keeps_its_place_in_the_channel(
    world: World, tmp_path: Path
) -> None:
    """A channel's messages are taken in the order they were sent: while the first one's
    attachment downloads, the next message (no attachment) waits, and is stored and answered
    after it."""
    w = world
    engine = ScriptedEngine(["read it", "and the next"])
    download = asyncio.Event()
    async with running_bot(w.fake, w.settings(tmp_path), engine=engine) as bot:
        w.fake.on_request("GET", r"(/media)?/attachments/.+", lambda _r: download.wait())
        first = await ask(w, "see the file", [FakeFile.text("notes.txt", "the notes")])
        second = await w.fake.user_message(
            w.general.id, w.bob, f"{w.fake.bot_user.mention} me next"
        )
        await w.fake.wait_for(lambda: w.fake.downloads, message="the download started")
        # a message sent after both, elsewhere, is answered while the download is held
        await w.fake.user_message(w.other.id, w.bob, f"{w.fake.bot_user.mention} elsewhere")
        await w.fake.wait_for(
            lambda: any(
                m.author.id == w.fake.bot_user.id for m in w.fake.channel_messages(w.other.id)
            )
        )
        assert await bot.memory.turns.for_message(second.id) is None  # it waits its turn
        download.set()
        await replied(w, bot, 2)
        turns = [t for t in await bot.memory.turns.history(w.general.id) if t.role == "user"]
        assert [t.message_id for t in turns] == [first.id, second.id]
        assert "the notes" in turns[0].content
