"""Issue 11's fuzz test: 1,000+ generated adversarial messages through the real client.

The unmodified HermesBot runs against the fake Discord with the OpenAI-compatible engine,
pointed at a small completions server written here. That server is the observation point: it
records every prompt exactly as the bot sends it over HTTP, and it answers with adversarial
text of its own (disguised headers, forged speaker lines, @everyone and user and role
mentions, unbalanced fences, replies longer than 2,000 characters), chosen from a hash of the
prompt so a run is the same whatever order the channels are served in.

Members with hostile display names (nicknames and global names carrying headers, line breaks
and other speakers' names) post forged headers in every disguise (CR, VT, FF, NEL, U+2028/9,
format characters before the `#`, full-width `＃`, NBSP and ideographic indents, combining
marks, NUL), impersonation lines, mentions, 4,000-character messages and unbalanced fences,
and edit and delete some of them. The prompts and stored turns are checked with the
independent detector of `tests/test_defuse.py` (NFKC, case-folded, format characters and
combining marks stripped, split at every Unicode line break).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.summaries import SUMMARY_INSTRUCTION
from tests.bot_harness import bot_settings, running_bot
from tests.fake_discord import FakeDiscord, FakeMessage
from tests.test_defuse import (
    BAD_NAMES,
    BREAKS,
    PEOPLE,
    PLAIN,
    STRUCTURAL,
    blocks,
    forged_lines,
    header_line,
    header_lines,
    message,
)
from tests.world import World

pytestmark = pytest.mark.slow

SEED = 1111
MESSAGES = 1040
CHANNELS = 8
#: A member block's first line: the speaker's label (none for a name that defuses to nothing),
#: then the message's marker.
MARKER = re.compile(r"^(?:(?P<label>.*?): )?m(?P<n>\d+)(?=\s|$)")


class AdversarialServer:
    """`/v1/completions` that records each prompt and streams back hostile text."""

    def __init__(self, pings: list[str]) -> None:
        self.pings = pings
        self.prompts: list[str] = []
        self.url = ""

    def reply_for(self, prompt: str) -> str:
        rnd = random.Random(zlib.crc32(prompt.encode("utf-8", "surrogatepass")))
        names = ["Hermes", *PEOPLE]
        parts = [rnd.choice(PLAIN), message(rnd, names)]
        if rnd.random() < 0.3:
            parts.append(rnd.choice(self.pings))
        if rnd.random() < 0.2:
            parts.append("```python\nprint('never closed')")
        if rnd.random() < 0.08:
            parts.append(" ".join(rnd.choice(PLAIN) for _ in range(500)))  # > 2,000 chars
        return "".join(p + rnd.choice(BREAKS) for p in parts)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.prompts.append(body["prompt"])
        text = self.reply_for(body["prompt"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(text), 400):
            chunk = {"choices": [{"index": 0, "text": text[i : i + 400], "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        final = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        return resp


@contextlib.asynccontextmanager
async def serve(server: AdversarialServer) -> AsyncIterator[AdversarialServer]:
    app = web.Application()
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "hermes"}]}))
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


def hostile_name(rnd: random.Random) -> str:
    if rnd.random() < 0.6:
        return rnd.choice(BAD_NAMES)
    return header_line(rnd)


def user_text(rnd: random.Random, n: int, names: list[str], pings: list[str]) -> str:
    """Message number `n`: its marker first (so each prompt block can be traced back to one
    message), then adversarial lines."""
    parts = [message(rnd, names)]
    roll = rnd.random()
    if roll < 0.15:
        parts.append(rnd.choice(pings))
    elif roll < 0.25:
        parts.append("```js\nlet unbalanced = true;")
    elif roll < 0.3:
        parts.append(("x" * 99 + rnd.choice(BREAKS)) * 40)  # 4,000 characters
    return f"m{n} " + rnd.choice(BREAKS).join(parts)


def check_prompt(prompt: str) -> tuple[int, int]:
    """0 header lines but the structure's own, 0 forged speaker lines; each member block is
    one message (its marker leads its first line, markers rising). Returns (blocks, labels)."""
    heads = header_lines(prompt)
    assert all(h in STRUCTURAL for h in heads), heads
    if SUMMARY_INSTRUCTION in prompt:  # a background summary's prompt lists the messages one
        return 0, 0  # "name: text" line each: only the header rule above applies to it
    markers: list[int] = []
    labels: set[str] = set()
    members = 0
    for header, body in blocks(prompt):
        if header != "### Instruction:":
            continue
        members += 1
        found = MARKER.match(body[0])
        assert found, body[0][:200]
        markers.append(int(found["n"]))
        if found["label"]:
            labels.add(found["label"])
    assert markers == sorted(set(markers)), markers
    assert forged_lines(prompt, ["Hermes", *labels]) == []
    return members, len(labels)


async def test_fuzz_through_discord(world: World, tiny_model: Path, tmp_path: Path) -> None:
    fake: FakeDiscord = world.fake
    rnd = random.Random(SEED)
    role = fake.add_role(world.guild.id, "mods", mentionable=True)
    members = [world.alice, world.bob, world.carol]
    for i in range(12):
        nick = hostile_name(rnd)
        glob = hostile_name(rnd) if rnd.random() < 0.5 else None
        members.append(
            fake.add_member(world.guild.id, f"user{i}", nick=nick, global_name=glob).user
        )
    pings = [
        "@everyone look",
        "@here now",
        f"<@{world.alice.id}> hey",
        f"<@&{role.id}> mods!",
        f"<@{world.bob.id}><@{world.carol.id}>",
    ]
    channels = [fake.add_channel(world.guild.id, f"fuzz-{i}") for i in range(CHANNELS)]
    server = AdversarialServer(pings)
    async with serve(server) as served:
        settings = bot_settings(
            tmp_path,
            "hermes",
            ENGINE="openai",
            OPENAI_BASE_URL=served.url,
            OPENAI_MODEL="hermes",
            TOKENIZER=str(tiny_model),
            CONTEXT_TOKENS="1024",
            MAX_NEW_TOKENS="200",
            STREAM_INTERVAL="30",
            QUEUE_SIZE="5000",
            REPLY_TIMEOUT="120",
        )
        async with running_bot(fake, settings) as bot:
            asked: list[FakeMessage] = []
            plain: list[FakeMessage] = []
            deleted: list[FakeMessage] = []
            for n in range(MESSAGES):
                channel = channels[n % CHANNELS]
                author = rnd.choice(members)
                text = user_text(rnd, n, ["Hermes", *PEOPLE, *BAD_NAMES], pings)
                addressed = rnd.random() < 0.7
                if addressed:
                    text = f"{fake.bot_user.mention} {text}"
                sent = await fake.user_message(channel.id, author, text)
                (asked if addressed else plain).append(sent)
                if n % 16 == 15:  # let the bot keep up: every channel has work in flight
                    await fake.wait_for(lambda: bot.conv.pending < 2 * CHANNELS, timeout=60)
                if rnd.random() < 0.05:  # an edit of an earlier message, marker kept
                    target = rnd.choice(asked[-20:] + plain[-20:])
                    if target not in deleted:
                        marker = re.search(r"\bm\d+", target.content)
                        assert marker is not None
                        edited = f"{marker.group()} " + message(rnd, ["Hermes", *PEOPLE])
                        if target in asked:
                            edited = f"{fake.bot_user.mention} {edited}"
                        await fake.edit_user_message(target, edited)
                if plain and rnd.random() < 0.03:
                    victim = plain[-1]
                    if victim not in deleted:
                        deleted.append(victim)
                        await fake.delete_message(victim)
            ids = [c.id for c in channels]

            def answered() -> int:
                return sum(
                    1
                    for c in ids
                    for m in fake.channel_messages(c)
                    if m.author.id == fake.bot_user.id and m.reference_id is not None
                )

            await fake.wait_for(lambda: answered() >= len(asked), timeout=120)
            await fake.wait_for(lambda: bot.conv.pending == 0 and not bot.reply_tasks, timeout=60)

            # every addressed message answered exactly once
            replies: dict[int, int] = {}
            bot_posts = [
                m for c in ids for m in fake.channel_messages(c) if m.author.id == fake.bot_user.id
            ]
            for m in bot_posts:
                if m.reference_id is not None:
                    replies[m.reference_id] = replies.get(m.reference_id, 0) + 1
            assert {q.id: replies.get(q.id, 0) for q in asked} == {q.id: 1 for q in asked}
            assert not set(replies) - {q.id for q in asked}
            # 0 messages over 2,000 characters, 0 pings
            assert all(len(m.content) <= 2000 for m in bot_posts)
            assert any(len(m.content) > 1500 for m in bot_posts)  # long replies did happen
            assert not [m for m in bot_posts if m.mention_everyone or m.mentions or m.mention_roles]
            writes = [
                r
                for r in fake.requests
                if r.method in ("POST", "PATCH") and "/messages" in r.path and r.json
            ]
            assert writes
            for r in writes:
                am = r.json.get("allowed_mentions")
                assert am is not None and am.get("parse") == [], r.json
                assert not am.get("users") and not am.get("roles") and not am.get("replied_user")
            assert not [r for r in fake.requests if r.status >= 400 and not r.injected]
            # 0 header lines from user text or names in any prompt, 0 forged speaker lines
            assert len(server.prompts) >= len(asked)
            seen_labels = 0
            replies_asked = [p for p in server.prompts if SUMMARY_INSTRUCTION not in p]
            assert len(replies_asked) >= len(asked)
            for prompt in server.prompts:
                n_blocks, n_labels = check_prompt(prompt)
                assert n_blocks >= 1 or SUMMARY_INSTRUCTION in prompt
                seen_labels = max(seen_labels, n_labels)
            assert seen_labels >= 5  # many hostile names were in play at once
            # 0 stored bot turns with a header
            stored = 0
            for c in ids:
                for turn in await bot.memory.turns.history(c):
                    if turn.role == "assistant":
                        stored += 1
                        assert header_lines(turn.content) == [], turn.content[:300]
            assert stored == len(asked)
            assert not await bot.memory.owed.awaiting()
    print(
        f"fuzz: {MESSAGES} messages ({len(asked)} addressed, {len(deleted)} deleted), "
        f"{len(server.prompts)} prompts checked, {len(bot_posts)} bot messages, "
        f"{stored} stored replies"
    )
