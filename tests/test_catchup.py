"""Catch-up (issue 11, hole 8): nothing addressed to the bot is lost to a restart, and nothing
is answered twice.

The real HermesBot runs against the fake Discord and is stopped and started again: messages
sent while it is down are read back from the channel history, replies still queued when it
stopped are answered after the start, a restart in the middle of catching up answers each
message once, and a new (not resumed) gateway session catches up the same way. Also the
schema v4 migration and the discord-free rules in `bot.discord.catchup`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.discord.catchup import Claims, history_floor, owed_replies, snowflake_at, snowflake_time
from bot.discord.client import HermesBot
from bot.discord.replying import Outcome, OwedReply
from bot.engine import EngineRequest
from bot.memory import Memory
from bot.settings import Settings, load_settings
from bot.store.db import MIGRATIONS, SCHEMA_VERSION, ensure_owed_replies
from bot.store.owed import ReplyPost
from bot.store.turns import StoredTurn
from tests.bot_harness import ScriptedEngine, bot_env, bot_settings
from tests.fake_discord import (
    EXECUTE_WEBHOOK,
    GET_MESSAGES,
    PATIENCE,
    FakeChannel,
    FakeDiscord,
    FakeMessage,
    start_client,
    stop_client,
)
from tests.world import World

QUESTION = re.compile(r"q\d+")


def answer(prompt: str) -> str:
    """The engine's reply names the question it answers (the last `qN` in the prompt)."""
    return "answer to " + QUESTION.findall(prompt)[-1]


class GatedEngine(ScriptedEngine):
    """Answers like `answer`, but generation number `hold_at` (0-based) waits for `hold`.

    (Not the harness's `gate`, which every generation waits for.)"""

    def __init__(self, hold_at: int) -> None:
        super().__init__(answer)
        self.hold_at = hold_at
        self.hold = asyncio.Event()
        self.fed = 0

    async def _feed(self, gen: EngineRequest, reply: str | BaseException) -> None:
        index, self.fed = self.fed, self.fed + 1
        if index == self.hold_at:
            await self.hold.wait()
        await super()._feed(gen, reply)


class Runs:
    """Starts the bot (again and again) on one fake; whatever is still running at the end of
    the test is stopped, failed or not."""

    def __init__(self, fake: FakeDiscord, settings: Settings) -> None:
        self.fake = fake
        self.settings = settings
        self.live: list[tuple[HermesBot, asyncio.Task[None]]] = []

    async def start(self, engine: ScriptedEngine) -> tuple[HermesBot, asyncio.Task[None]]:
        bot = HermesBot(self.settings, engine=engine, guild_ready_timeout=0.05)
        task = await start_client(bot, self.fake, timeout=PATIENCE)
        self.live.append((bot, task))
        await bot.wait_until_ready()
        return bot, task

    async def stop(self, bot: HermesBot, task: asyncio.Task[None]) -> None:
        self.live.remove((bot, task))
        await stop_client(bot, task)
        await self.fake.wait_disconnected()

    async def __aenter__(self) -> Runs:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for bot, task in self.live:
            with contextlib.suppress(Exception):
                await stop_client(bot, task)


async def stop_with_held_reply(runs: Runs, bot: HermesBot, task, engine: GatedEngine) -> None:
    """Shut down while one reply is generating (held) and others wait in the queue: the queue
    is cancelled at once, then the held reply is let through and finishes."""
    closing = asyncio.create_task(runs.stop(bot, task))
    await runs.fake.wait_for(lambda: bot.conv.pending == 1)
    engine.hold.set()
    await closing


async def ask(fake: FakeDiscord, channel: FakeChannel, author, n: int) -> FakeMessage:
    return await fake.user_message(channel.id, author, f"{fake.bot_user.mention} question q{n}")


def replies_to(fake: FakeDiscord, channel_ids: list[int]) -> dict[int, list[FakeMessage]]:
    """Bot messages per message they reply to."""
    out: dict[int, list[FakeMessage]] = {}
    for channel_id in channel_ids:
        for m in fake.channel_messages(channel_id):
            if m.author.id == fake.bot_user.id and m.reference_id is not None:
                out.setdefault(m.reference_id, []).append(m)
    return out


def hook_messages(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    """What personas posted through the bot's webhooks in a channel."""
    return [m for m in fake.channel_messages(channel_id) if m.webhook_id is not None]


def bot_messages(fake: FakeDiscord, channel_ids: list[int]) -> list[FakeMessage]:
    return [
        m for c in channel_ids for m in fake.channel_messages(c) if m.author.id == fake.bot_user.id
    ]


async def assert_each_answered_once(
    fake: FakeDiscord, bot: HermesBot, asked: list[FakeMessage], channel_ids: list[int]
) -> None:
    replies = replies_to(fake, channel_ids)
    for q in asked:
        got = replies.get(q.id, [])
        n = QUESTION.findall(q.content)[-1]
        assert [m.content for m in got] == [f"answer to {n}"], (q.content, got)
    assert len(bot_messages(fake, channel_ids)) == len(asked)  # nothing else was posted
    assert not await bot.memory.owed.awaiting()
    for channel_id in channel_ids:
        turns = await bot.memory.turns.history(channel_id)
        stored = [t for t in turns if t.role == "user"]
        mine = [q for q in asked if q.channel_id == channel_id]
        assert sorted(t.message_id for t in stored) == sorted(q.id for q in mine)
        assert len([t for t in turns if t.role == "assistant"]) == len(mine)


async def test_restart_answers_missed_and_queued_messages_once(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    settings = bot_settings(tmp_path, "x")
    channels = [world.general, world.other]
    ids = [c.id for c in channels]
    asked: list[FakeMessage] = []
    async with Runs(fake, settings) as runs:
        # First run: one reply is generating and five wait in the queue when the bot stops.
        first = GatedEngine(hold_at=1)
        bot, task = await runs.start(first)
        asked.append(await ask(fake, world.other, world.bob, 0))
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 1)
        for n in range(1, 7):
            asked.append(await ask(fake, world.general, (world.alice, world.bob)[n % 2], n))
        await fake.wait_for(lambda: bot.conv.pending == 6 and len(first.prompts) == 2)
        await stop_with_held_reply(runs, bot, task, first)
        assert len(bot_messages(fake, ids)) == 2  # the held reply finished; five are owed
        memory = await Memory.open(settings.db_path)
        try:
            owed = await memory.owed.awaiting()
        finally:
            await memory.close()
        assert [t.message_id for t in owed] == [q.id for q in asked[2:]]

        # While it is down: 20 questions in two channels, and two too old for the window.
        for n in range(7, 27):
            author = (world.alice, world.carol)[n % 3 > 0]
            asked.append(await ask(fake, channels[n % 2], author, n))
        assert all(q.delivered == 0 for q in asked[7:])
        old = datetime.now(UTC) - timedelta(minutes=45)
        stale = [
            await fake.user_message(
                world.general.id, world.alice, f"{fake.bot_user.mention} stale q{90 + i}", at=old
            )
            for i in range(2)
        ]

        # Second run: all 25 owed replies, oldest first per channel, and nothing else.
        second = ScriptedEngine(answer)
        bot, task = await runs.start(second)
        await fake.wait_for(
            lambda: len(bot_messages(fake, ids)) == len(asked) and bot.conv.pending == 0,
        )
        await fake.wait_for(lambda: not bot.reply_tasks)
        assert len(second.prompts) == 25
        await assert_each_answered_once(fake, bot, asked, ids)
        for channel in channels:  # oldest first within each channel
            order = [m.reference_id for m in bot_messages(fake, [channel.id])]
            assert order == sorted(order)
        assert not any(m.id in replies_to(fake, ids) for m in stale)
        assert await bot.memory.turns.for_message(stale[0].id) is None


async def test_restart_during_catch_up_answers_once(world: World, tmp_path: Path) -> None:
    fake = world.fake
    ids = [world.general.id]
    async with Runs(fake, bot_settings(tmp_path, "x")) as runs:
        bot, task = await runs.start(ScriptedEngine(answer))
        asked = [await ask(fake, world.general, world.alice, 0)]
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 1)
        await runs.stop(bot, task)

        for n in range(1, 11):
            asked.append(await ask(fake, world.general, (world.alice, world.bob)[n % 2], n))
        # Catch-up answers three, is generating the fourth, and six wait when the bot stops.
        catching = GatedEngine(hold_at=3)
        bot, task = await runs.start(catching)
        await fake.wait_for(
            lambda: len(bot_messages(fake, ids)) == 4 and len(catching.prompts) == 4
        )
        await stop_with_held_reply(runs, bot, task, catching)
        assert len(bot_messages(fake, ids)) == 5

        for n in range(11, 13):
            asked.append(await ask(fake, world.general, world.carol, n))
        last = ScriptedEngine(answer)
        bot, task = await runs.start(last)
        await fake.wait_for(
            lambda: len(bot_messages(fake, ids)) == len(asked) and bot.conv.pending == 0,
        )
        await fake.wait_for(lambda: not bot.reply_tasks)
        assert len(last.prompts) == 8  # the six left waiting and the two sent meanwhile
        await assert_each_answered_once(fake, bot, asked, ids)


async def test_new_gateway_session_catches_up_and_a_resume_does_not(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    ids = [world.general.id]
    engine = ScriptedEngine(answer)
    async with Runs(fake, bot_settings(tmp_path, "x")) as runs:
        bot, _ = await runs.start(engine)
        asked = [await ask(fake, world.general, world.alice, 0)]
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 1)

        # Resumed: Discord replays what was missed; catch-up adds nothing.
        fake.pause_gateway()
        await fake.disconnect_gateway(resumable=True)
        await fake.wait_for(lambda: fake.pending_handshakes == 1)
        asked.append(await ask(fake, world.general, world.bob, 1))
        fake.resume_gateway()
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 2)

        # Not resumable: a fresh READY, nothing replayed; catch-up reads it back.
        fake.pause_gateway()
        fake.expire_sessions()
        await fake.wait_for(lambda: fake.pending_handshakes >= 1)
        for n in range(2, 5):
            asked.append(await ask(fake, world.general, world.carol, n))
        assert all(q.delivered == 0 for q in asked[2:])
        identified = fake.identify_count
        fake.resume_gateway()
        await fake.wait_for(lambda: fake.identify_count > identified)
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 5 and bot.conv.pending == 0)
        await fake.wait_for(lambda: not bot.reply_tasks)
        assert len(engine.prompts) == 5
        await assert_each_answered_once(fake, bot, asked, ids)


async def test_catch_up_reads_only_the_newest_messages_up_to_the_cap(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    ids = [world.general.id]
    engine = ScriptedEngine(answer)
    async with Runs(fake, bot_settings(tmp_path, "x", CATCHUP_MESSAGES="3")) as runs:
        bot, task = await runs.start(engine)
        asked = [await ask(fake, world.general, world.alice, 0)]
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 1)
        await runs.stop(bot, task)
        missed = [await ask(fake, world.general, world.bob, n) for n in range(1, 6)]
        bot, _ = await runs.start(engine)
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 4 and bot.conv.pending == 0)
        await fake.wait_for(lambda: not bot.reply_tasks)
        await assert_each_answered_once(fake, bot, asked + missed[-3:], ids)


async def test_a_mention_in_a_new_channel_and_a_first_dm_sent_while_down_are_answered(
    world: World, tmp_path: Path
) -> None:
    """Catch-up reads more than the channels memory knows: a server channel the bot never
    stored anything from, where it was mentioned while down, and the DM of a member it knows
    from a server. A mention older than CATCHUP_MINUTES is not answered (it would have been
    answered before the newer one of its channel), and a new channel where nobody asked for
    the bot is not read into memory."""
    fake = world.fake
    settings = bot_settings(tmp_path, "x")
    async with Runs(fake, settings) as runs:
        bot, task = await runs.start(ScriptedEngine(answer))
        asked = await ask(fake, world.general, world.bob, 0)  # the bot knows bob from a server
        await fake.wait_for(lambda: len(bot_messages(fake, [world.general.id])) == 1)
        assert not await bot.memory.turns.history(world.other.id)  # #other is new to it
        await runs.stop(bot, task)

        before = datetime.now(UTC) - timedelta(minutes=settings.catchup_minutes + 15)
        mention = fake.bot_user.mention
        stale = await fake.user_message(
            world.other.id, world.alice, f"{mention} old q90", at=before
        )
        await fake.user_message(world.other.id, world.carol, "just chatting")
        fresh = await ask(fake, world.other, world.alice, 1)
        dm = fake.dm_channel(world.bob)
        direct = await fake.user_message(dm.id, world.bob, "a private question q2")
        quiet = fake.add_channel(world.guild.id, "quiet")
        await fake.user_message(quiet.id, world.alice, "nothing for the bot here")
        assert all(m.delivered == 0 for m in (stale, fresh, direct))

        bot, task = await runs.start(ScriptedEngine(answer))
        ids = [world.other.id, dm.id]
        await fake.wait_for(
            lambda: len(bot_messages(fake, ids)) == 2 and bot.conv.pending == 0
            and not bot.reply_tasks
        )  # fmt: skip
        replies = replies_to(fake, ids)
        assert [m.content for m in replies[fresh.id]] == ["answer to q1"]
        assert [m.content for m in replies[direct.id]] == ["answer to q2"]
        assert stale.id not in replies and len(bot_messages(fake, ids)) == 2
        stored = await bot.memory.turns.history(world.other.id)
        assert [t.content for t in stored if t.role == "user"][:2] == [
            "just chatting",
            "question q1",
        ]
        assert not await bot.memory.turns.history(quiet.id)
        assert not await bot.memory.owed.awaiting()
        assert asked.id in replies_to(fake, [world.general.id])


async def test_off_channel_and_already_replied_messages_are_not_answered(
    world: World, tmp_path: Path
) -> None:
    """A channel switched off is not read back, nor one with nothing new (the gateway's
    last message id says so); a message whose reply is already in the channel (the bot stopped
    between posting and storing) is stored but not answered again."""
    fake = world.fake
    quiet = fake.add_channel(world.guild.id, "quiet")
    idle = fake.add_channel(world.guild.id, "idle")
    engine = ScriptedEngine(answer)
    general = [world.general.id]
    async with Runs(fake, bot_settings(tmp_path, "x")) as runs:
        bot, task = await runs.start(engine)
        await ask(fake, world.general, world.alice, 0)
        await fake.wait_for(lambda: len(bot_messages(fake, general)) == 1)
        await fake.user_message(idle.id, world.bob, "just a remark")
        await fake.wait_for(lambda: fake.last_message(idle.id).delivered)
        await bot.memory.places.update_channel(quiet.id, world.guild.id, mode="off")
        await runs.stop(bot, task)

        await ask(fake, quiet, world.alice, 1)
        replied = await ask(fake, world.general, world.bob, 2)
        # the bot's reply that reached Discord but not memory
        await fake.user_message(
            world.general.id, fake.bot_user, "answer to q2", reply_to=replied, mention_author=False
        )
        await ask(fake, world.general, world.carol, 3)
        bot, _ = await runs.start(engine)
        await fake.wait_for(lambda: len(bot_messages(fake, general)) == 3 and bot.conv.pending == 0)
        await fake.wait_for(lambda: not bot.reply_tasks)
        assert len(engine.prompts) == 2
        assert not bot_messages(fake, [quiet.id])
        assert not await bot.memory.turns.history(quiet.id)
        assert [t.content for t in await bot.memory.turns.history(idle.id)] == ["just a remark"]
        history_reads = {r.path for r in fake.find_requests(*GET_MESSAGES)}
        assert f"/channels/{world.general.id}/messages" in history_reads
        assert not {f"/channels/{c.id}/messages" for c in (quiet, idle)} & history_reads
        turn = await bot.memory.turns.for_message(replied.id)
        assert turn is not None and turn.content == "question q2"
        assert len(replies_to(fake, general)[replied.id]) == 1
        assert not await bot.memory.owed.awaiting()


async def test_a_channel_out_of_reach_does_not_stop_the_others(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = world.fake
    ids = [world.general.id, world.other.id]
    engine = ScriptedEngine(answer)
    async with Runs(fake, bot_settings(tmp_path, "x")) as runs:
        bot, task = await runs.start(engine)
        asked = [
            await ask(fake, c, world.alice, i) for i, c in enumerate((world.general, world.other))
        ]
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 2)
        await runs.stop(bot, task)
        lost = await ask(fake, world.general, world.bob, 2)
        asked.append(await ask(fake, world.other, world.bob, 3))
        refusal = {"message": "Missing Access", "code": 50001}
        fake.inject("GET", f"/channels/{world.general.id}/messages", 403, body=refusal)
        bot, _ = await runs.start(engine)
        await fake.wait_for(lambda: len(bot_messages(fake, ids)) == 3 and bot.conv.pending == 0)
        await fake.wait_for(lambda: not bot.reply_tasks)
        await assert_each_answered_once(fake, bot, asked, ids)
        assert lost.id not in replies_to(fake, ids)
    skipped = [r for r in caplog.records if "catch-up skipped channel" in r.getMessage()]
    assert len(skipped) == 1 and "403" in skipped[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]


# ---- memory: schema v4 ---------------------------------------------------------------------


async def test_v4_migrates_a_v2_file_and_tracks_owed_replies(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0] + MIGRATIONS[1])
    con.execute(
        "INSERT INTO turns (channel_id, message_id, name, role, content, created_at) "
        "VALUES (5, 50, 'ann', 'user', 'old', 1.0)"
    )
    con.execute("INSERT INTO turn_messages VALUES (50, 1)")
    con.execute("PRAGMA user_version=2")
    con.commit()
    con.close()
    memory = await Memory.open(path)
    try:
        assert MIGRATIONS[3] is ensure_owed_replies  # v4, after recall's v3
        assert (await memory.db.execute_fetchall("PRAGMA user_version"))[0][0] == SCHEMA_VERSION
        assert not await memory.owed.awaiting()  # old turns are owed nothing
        owed = await memory.turns.add(5, "user", "q", name="bob", message_id=60, awaiting=True)
        other = await memory.turns.add(7, "user", "q2", name="cy", message_id=70, awaiting=True)
        assert [t.id for t in await memory.owed.awaiting()] == [owed, other]
        await memory.turns.add(
            5, "assistant", "a", message_id=61, extra_message_ids=[62], answers=owed
        )
        assert [t.id for t in await memory.owed.awaiting()] == [other]
        assert await memory.owed.mark_answered(other) is True
        assert await memory.owed.mark_answered(other) is False  # only one caller wins
        assert await memory.owed.newest_message_id(5) == 62
        assert await memory.owed.newest_message_id(99) is None
        await memory.places.update_channel(9, 3, mode="off")
        assert await memory.owed.known_channels() == [(5, None), (7, None), (9, 3)]
    finally:
        await memory.close()


async def test_a_file_numbered_past_v4_without_the_column_gets_it(tmp_path: Path) -> None:
    """A file migrated while the scenes version briefly held number 4 lacks `awaiting`."""
    path = tmp_path / "early.db"
    memory = await Memory.open(path)
    await memory.close()
    con = sqlite3.connect(path)
    con.execute("DROP INDEX turns_awaiting")
    con.execute("ALTER TABLE turns DROP COLUMN awaiting")
    con.commit()
    con.close()
    memory = await Memory.open(path)
    try:
        owed = await memory.turns.add(1, "user", "q", message_id=5, awaiting=True)
        assert [t.id for t in await memory.owed.awaiting()] == [owed]
    finally:
        await memory.close()


# ---- the rules in bot.discord.catchup ----------------------------------------------------------------


def stored(turn_id: int, created_at: float) -> StoredTurn:
    return StoredTurn(turn_id, 1, None, turn_id, 2, "ann", "user", None, "q", 1, created_at)


def test_history_floor_is_the_newest_stored_message_within_the_window() -> None:
    now = time.time()
    window = snowflake_at(now - 30 * 60)
    assert abs(snowflake_time(window) - (now - 1800)) < 0.002
    assert history_floor(None, now, 30) == window
    assert history_floor(window - 5, now, 30) == window  # older than the window
    assert history_floor(window + 5, now, 30) == window + 5


def test_owed_replies_drop_what_is_older_than_the_window() -> None:
    now = 10_000.0
    owed = owed_replies([stored(3, now - 60), stored(1, now - 4000), stored(2, now - 10)], now, 30)
    assert [t.id for t in owed.answer] == [2, 3]
    assert [t.id for t in owed.expired] == [1]


def test_claims_take_a_message_once_and_forget_the_oldest() -> None:
    claims = Claims(size=2)
    assert claims.claim(1) and not claims.claim(1)
    claims.release(1)
    assert claims.claim(1) and claims.claim(2) and claims.claim(3)
    assert 1 not in claims and 3 in claims


# ---- a reply posted just before a kill -------------------------------------------------------


async def test_sigkill_after_a_persona_reply_is_posted_leaves_exactly_one_reply(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The known defect: a persona's reply goes out through a webhook (which cannot reply to
    the message it answers), and the process is killed before it stores the reply. After the
    restart catch-up finds the post the killed run recorded, adopts the reply already in the
    channel as the answer, and posts nothing more."""
    fake = world.fake
    env = bot_env(tmp_path, "x")
    settings = load_settings(env=env, env_file=None)
    memory = await Memory.open(settings.db_path)
    try:
        await memory.places.update_channel(
            world.general.id, world.guild.id, mode="always", persona="Sable"
        )
    finally:
        await memory.close()
    root = Path(__file__).resolve().parents[1]
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bot_process",
        fake.api_base,
        fake.gateway_url,
        "The name's Sable.",
        cwd=root,
        env={**os.environ, **env, "PYTHONPATH": str(root)},
    )
    try:
        await fake.wait_for(
            lambda: any(event == "GUILD_CREATE" for event, _ in fake.dispatched),
            message="the bot process connected",
        )
        killed: list[int] = []

        def kill(_request: object) -> None:  # the post reaches Discord; its answer never returns
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

        fake.on_request(*EXECUTE_WEBHOOK, kill)
        question = await fake.user_message(world.general.id, world.bob, "Who are you?")
        assert await asyncio.wait_for(child.wait(), PATIENCE) == -signal.SIGKILL
        assert killed
        (posted,) = hook_messages(fake, world.general.id)
        assert posted.content == "The name's Sable." and posted.username == "Sable"
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()

    caplog.set_level(logging.INFO, logger="bot.discord.catchup")
    engine = ScriptedEngine(["Still Sable."])
    async with Runs(fake, settings) as runs:
        bot, _ = await runs.start(engine)
        await fake.wait_for(
            lambda: any("catch-up:" in r.getMessage() for r in caplog.records),
            message="catch-up's summary",
        )
        (summary,) = [r.getMessage() for r in caplog.records if "catch-up:" in r.getMessage()]
        assert "0 owed replies queued, 1 found already posted" in summary
        assert not await bot.memory.owed.awaiting()
        turns = await bot.memory.turns.history(world.general.id)
        assert [(t.role, t.content, t.persona) for t in turns] == [
            ("user", "Who are you?", None),
            ("assistant", "The name's Sable.", "Sable"),
        ]
        assert turns[0].message_id == question.id
        assert await bot.memory.turns.message_ids(turns[1].id) == [posted.id]

        # the next message is answered as usual, and sees the adopted reply in its prompt
        await fake.user_message(world.general.id, world.bob, "And now?")
        await fake.wait_for(lambda: len(hook_messages(fake, world.general.id)) == 2)
        assert [m.content for m in hook_messages(fake, world.general.id)] == [
            "The name's Sable.",
            "Still Sable.",
        ]
        assert len(engine.prompts) == 1 and "The name's Sable." in engine.prompts[0]


async def test_an_owed_reply_settles_once_and_its_post_is_recorded_until_then(
    tmp_path: Path,
) -> None:
    memory = await Memory.open(tmp_path / "owed.db")
    try:
        first = await memory.turns.add(5, "user", "q1", name="ann", message_id=50, awaiting=True)
        second = await memory.turns.add(5, "user", "q2", name="bob", message_id=51, awaiting=True)
        owed = OwedReply(memory.owed, first, 50)
        await owed.posting("Sable")
        assert await memory.owed.posts() == {first: ReplyPost(first, "Sable", None)}
        await owed.posted(60)
        await owed.posted(61)  # only the first message's id is kept
        assert await memory.owed.posts() == {first: ReplyPost(first, "Sable", 60)}
        # storing the reply settles it, and the record of its post goes with it
        await memory.turns.add(5, "assistant", "a1", message_id=60, answers=first)
        owed.stored()
        assert owed.outcome is Outcome.ANSWERED and not await memory.owed.posts()
        assert await owed.settle(Outcome.FAILED) is False  # settled once: nothing changes
        assert owed.outcome is Outcome.ANSWERED

        other = OwedReply(memory.owed, second, 51)
        await other.posting(None)
        assert await other.settle(Outcome.GIVEN_UP) is True
        assert await other.settle(Outcome.CANCELLED) is False
        assert other.outcome is Outcome.GIVEN_UP
        assert not await memory.owed.awaiting() and not await memory.owed.posts()
    finally:
        await memory.close()


async def test_v6_adds_the_reply_posts_to_a_v5_file(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    memory = await Memory.open(path)
    await memory.close()
    con = sqlite3.connect(path)
    con.execute("DROP TABLE reply_posts")
    con.execute("PRAGMA user_version=5")
    con.commit()
    con.close()
    memory = await Memory.open(path)
    try:
        assert (await memory.db.execute_fetchall("PRAGMA user_version"))[0][0] == SCHEMA_VERSION
        turn = await memory.turns.add(1, "user", "q", message_id=5, awaiting=True)
        await memory.owed.posting(turn, None)
        assert list(await memory.owed.posts()) == [turn]
    finally:
        await memory.close()
