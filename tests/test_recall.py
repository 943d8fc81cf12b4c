"""Long-term recall: the FTS5 index follows every change to memory, and recall finds old facts.

All against a real SQLite file through `bot.memory.Memory`; nothing is mocked.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot.memory import Memory
from bot.recall import match_expression, query_terms, recall
from bot.store.db import MIGRATIONS, SCHEMA_VERSION, Database

FILLER = [
    "the weather is grey again today",
    "anyone up for a game tonight?",
    "I fixed the bug in the parser",
    "lunch was pasta, not bad",
    "the build is green now",
]


async def fill(memory: Memory, channel: int, n: int, *, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        role = "user" if i % 2 == 0 else "assistant"
        ids.append(
            await memory.turns.add(
                channel, role, f"{FILLER[i % len(FILLER)]} ({i})", name="ann", author_id=7
            )
        )
    return ids


async def found(memory: Memory, channel: int, text: str) -> list[str]:
    return [
        t.content
        for t, _ in await memory.turns.search(channel, match_expression(query_terms([text])))
    ]


async def test_index_follows_insert_edit_delete_clear(memory: Memory):
    assert memory.fts
    tid = await memory.turns.add(1, "user", "my sister lives in Lisbon", name="bob", message_id=55)
    await memory.turns.add(2, "user", "Lisbon is lovely", name="eve")  # another channel
    assert await found(memory, 1, "where is Lisbon") == ["my sister lives in Lisbon"]
    # porter stemming: "living" finds "lives"; the speaker's name is searchable too
    assert await found(memory, 1, "living") == ["my sister lives in Lisbon"]
    assert await found(memory, 1, "bob") == ["my sister lives in Lisbon"]

    assert await memory.turns.edit_message(55, "my sister moved to Porto")
    assert await found(memory, 1, "Lisbon") == []
    assert await found(memory, 1, "Porto") == ["my sister moved to Porto"]

    assert await memory.turns.delete_message(55)
    assert await found(memory, 1, "Porto") == []  # a deleted message is never recalled
    assert tid not in {t.id for t in await memory.turns.recent(1)}

    await memory.turns.add(1, "user", "the Porto trip is booked", name="bob")
    assert await memory.turns.clear(1) == 1
    assert await found(memory, 1, "Porto") == []
    assert await found(memory, 2, "Lisbon") == ["Lisbon is lovely"]


async def test_forgotten_turns_are_not_found_until_unforgotten(memory: Memory):
    await memory.turns.add(1, "user", "the vault code is 4471", name="bob")
    await memory.turns.forget(1)
    await memory.turns.add(1, "user", "what was the vault code?", name="bob")
    assert await found(memory, 1, "vault") == ["what was the vault code?"]
    assert await memory.turns.unforget(1)
    assert sorted(await found(memory, 1, "vault")) == [
        "the vault code is 4471",
        "what was the vault code?",
    ]


async def test_user_text_is_never_fts_syntax(memory: Memory):
    await memory.turns.add(1, "user", 'a "quoted" NEAR(thing) OR* -minus col:umn', name="bob")
    for nasty in ['"', "NEAR(", "col:umn", "AND OR NOT", "*", "^start"]:
        await found(memory, 1, nasty)  # never an FTS5 syntax error
    assert await found(memory, 1, "quoted minus") == ['a "quoted" NEAR(thing) OR* -minus col:umn']


async def test_migration_builds_the_index_on_a_v2_database(tmp_path: Path):
    path = tmp_path / "v2.db"
    con = sqlite3.connect(path)
    con.executescript(MIGRATIONS[0])
    con.executescript(MIGRATIONS[1])
    con.execute("PRAGMA user_version=2")
    for i, text in enumerate(["we met at the lighthouse", "nice", "the lighthouse was red"]):
        con.execute(
            "INSERT INTO turns (channel_id, name, role, content, created_at) VALUES (?,?,?,?,?)",
            (5, "ann", "user", text, 1.0 + i),
        )
    con.commit()
    con.close()

    mem = await Memory.open(path)
    try:
        assert mem.fts
        (version,) = await (await mem.db.execute("PRAGMA user_version")).fetchone()  # type: ignore[misc]
        assert version == SCHEMA_VERSION >= 3  # v3 is the index; later versions follow it
        assert sorted(await found(mem, 5, "lighthouse")) == [
            "the lighthouse was red",
            "we met at the lighthouse",
        ]
        await mem.turns.add(5, "user", "a new lighthouse story", name="ann")  # triggers work
        assert len(await found(mem, 5, "lighthouse")) == 3
    finally:
        await mem.close()


async def test_recall_finds_an_early_fact_outside_the_window(memory: Memory):
    await fill(memory, 9, 10)
    fact = await memory.turns.add(9, "user", "my dog is called Biscuit", name="bob", author_id=8)
    await fill(memory, 9, 400, start=10)
    window_start = (await memory.turns.recent(9, limit=30))[-1].id
    got = await recall(
        memory,
        9,
        ["what was the name of my dog again?"],
        before_id=window_start,
        budget_tokens=200,
    )
    ids = [t.id for t in got]
    assert fact in ids and all(i < window_start for i in ids)
    assert ids == sorted(ids)  # oldest first
    assert ids.index(fact) > 0 and ids[ids.index(fact) - 1] == fact - 1  # with its context turn


async def test_recall_respects_budget_blocks_boilerplate_and_duplicates(memory: Memory):
    blocked = await memory.turns.add(
        3, "user", "the password is swordfish", name="mal", author_id=66
    )
    notice = await memory.turns.add(3, "assistant", "*(I had nothing to say about swordfish)*")
    first = await memory.turns.add(3, "user", "swordfish steak for dinner", name="bob", author_id=8)
    dupe = await memory.turns.add(3, "user", "swordfish steak for dinner!", name="bob", author_id=8)
    await fill(memory, 3, 50)
    got = await recall(
        memory, 3, ["swordfish?"], before_id=None, budget_tokens=1000, exclude_authors={66}
    )
    ids = {t.id for t in got}
    assert blocked not in ids and notice not in ids
    assert (first in ids) != (dupe in ids)  # one of the two near-identical lines, not both
    assert await recall(memory, 3, ["swordfish"], before_id=None, budget_tokens=0) == []
    small = await recall(memory, 3, ["swordfish"], before_id=None, budget_tokens=20)
    assert sum((t.tokens or len(t.content) // 3) + 12 for t in small) <= 20


async def test_recall_is_off_without_an_index(tmp_path: Path):
    opened = await Database.open(tmp_path / "m.db")
    # the file as an SQLite build without FTS5 opens it (`Database.open` finds no index there)
    mem = Memory(Database(opened.conn, opened.path, fts=False))
    try:
        await mem.turns.add(1, "user", "remember the lighthouse", name="ann")
        assert await recall(mem, 1, ["lighthouse"], before_id=None, budget_tokens=500) == []
        assert await mem.turns.search(1, "lighthouse") == []
    finally:
        await mem.close()


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["Hi! What's the NAME of my cat?"], ["name", "cat"]),
        (["cat 42", "the cat"], ["cat", "42"]),
        (["Ünïcode café"], ["ünïcode", "café"]),
    ],
)
def test_query_terms(texts: list[str], expected: list[str]):
    assert query_terms(texts) == expected


# ---- through the bot's prompt builder ------------------------------------------------------


class CountingEngine:
    """The engine as `Conversations` sees it when building prompts: the real tokenizer's count."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


async def long_channel(memory: Memory, *, fact_author: int = 8) -> tuple[int, int]:
    """A channel with a fact said early and 600 turns of chat after it; returns (fact, question)."""
    await fill(memory, 77, 6)
    fact = await memory.turns.add(
        77, "user", "my dog is called Biscuit", name="bob", guild_id=1, author_id=fact_author
    )
    await fill(memory, 77, 600, start=6)
    question = await memory.turns.add(
        77, "user", "what was the name of my dog again?", name="bob", guild_id=1, author_id=8
    )
    return fact, question


def conversations(settings, memory: Memory, tokenizer):
    from bot.conversation import Conversations

    return Conversations(settings, memory, CountingEngine(tokenizer))


async def test_recall_puts_an_early_fact_into_a_late_prompt(
    memory: Memory, settings_factory, llama_tokenizer
):
    from bot.prompt import RECALL_HEADING

    fact, question = await long_channel(memory)
    settings = settings_factory(CONTEXT_TOKENS=1024, MAX_NEW_TOKENS=128)
    job = await conversations(settings, memory, llama_tokenizer).prepare(77, 1, reply_to=question)
    assert job is not None
    assert fact not in {t.id for t in job.prompt.turns}  # far outside the window...
    assert fact in {t.id for t in job.prompt.recalled}  # ...and recalled
    text = job.prompt.text
    assert RECALL_HEADING in text and "bob: my dog is called Biscuit" in text
    # the recall block sits after the current message: the history before it is a stable prefix
    assert text.index("what was the name of my dog again?") < text.index(RECALL_HEADING)
    assert text.endswith("### Response:\n")
    real = len(llama_tokenizer(text).input_ids)
    assert real <= job.prompt.tokens <= 1024 - 128


async def test_blocked_members_are_never_recalled(
    memory: Memory, settings_factory, llama_tokenizer
):
    fact, question = await long_channel(memory, fact_author=66)
    await memory.places.set_blocked(1, "user", 66, True)
    settings = settings_factory(CONTEXT_TOKENS=1024, MAX_NEW_TOKENS=128)
    job = await conversations(settings, memory, llama_tokenizer).prepare(77, 1, reply_to=question)
    assert job is not None and "Biscuit" not in job.prompt.text
    assert all(t.id != fact for t in job.prompt.recalled)


async def test_recall_off_changes_nothing(memory: Memory, settings_factory, llama_tokenizer):
    from bot.prompt import RECALL_HEADING, seen_by
    from bot.prompt_window import TokenCounter, fit_prompt

    fact, question = await long_channel(memory)
    settings = settings_factory(CONTEXT_TOKENS=1024, MAX_NEW_TOKENS=128, RECALL="off")
    conv = conversations(settings, memory, llama_tokenizer)
    job = await conv.prepare(77, 1, reply_to=question)
    assert job is not None and job.prompt.recalled == [] and RECALL_HEADING not in job.prompt.text
    # exactly the prompt the window alone gives: the whole budget goes to the history
    turns = await memory.turns.recent(77)
    expected = fit_prompt(
        settings.system_prompt,
        # (the filler's replies are signed "ann": Hermes sees them as ann's named lines)
        seen_by([t.to_turn() for t in turns[1:]], "Hermes"),
        turns[0].to_turn(),
        TokenCounter(CountingEngine(llama_tokenizer).count_tokens),
        1024 - 128,
        slack=settings.fit_slack,
    )
    assert job.prompt.text == expected.text


async def test_nothing_recalled_while_the_history_fits(
    memory: Memory, settings_factory, llama_tokenizer
):
    await memory.turns.add(5, "user", "my dog is called Biscuit", name="bob")
    question = await memory.turns.add(5, "user", "what is my dog called?", name="bob")
    on = settings_factory(CONTEXT_TOKENS=1024, MAX_NEW_TOKENS=128)
    off = settings_factory(CONTEXT_TOKENS=1024, MAX_NEW_TOKENS=128, RECALL="off")
    a = await conversations(on, memory, llama_tokenizer).prepare(5, reply_to=question)
    b = await conversations(off, memory, llama_tokenizer).prepare(5, reply_to=question)
    assert a is not None and b is not None
    assert a.prompt.text == b.prompt.text and a.prompt.recalled == []


def test_rare_terms_skip_what_the_window_keeps_saying():
    from bot.recall import SEARCH_TERMS, rare_terms

    window = ["the game tonight?", "game lag again", "the server is laggy", "game server down"]
    assert rare_terms(["game", "server", "kitten"], window) == ["kitten", "server"]
    assert rare_terms(["game"], window) == []  # in 3 of 4 window turns: too common to search
    many = [f"word{i}" for i in range(20)]
    assert len(rare_terms(many, [])) == SEARCH_TERMS


@pytest.mark.slow
async def test_admin_memory_search_shows_what_recall_finds(world, tmp_path: Path):
    from tests.bot_harness import ScriptedEngine, running_bot

    w = world
    async with running_bot(w.fake, w.settings(tmp_path), engine=ScriptedEngine(["ok"])) as bot:
        await bot.memory.turns.add(
            w.general.id, "user", "my dog is called Biscuit", name="bob", author_id=w.bob.id
        )
        await bot.memory.turns.add(
            w.general.id, "user", "the dog ate my homework", name="mal", author_id=w.carol.id
        )
        await bot.memory.places.set_blocked(w.guild.id, "user", w.carol.id, True)

        async def search(user, query: str) -> tuple[str, bool]:
            handle = await w.fake.invoke_command(
                w.general.id, user, "admin memory search", {"query": query}
            )
            response = await handle.wait_message(10)  # the deferred answer
            return response.content, response.ephemeral

        text, private = await search(w.admin, "what's my dog's name?")
        assert (
            private and "Recall would show" in text and "**bob**: my dog is called Biscuit" in text
        )
        assert "homework" not in text  # a blocked member is never recalled
        text, _ = await search(w.admin, "quantum chromodynamics")
        assert text == "Recall finds nothing here for that."
        text, _ = await search(w.alice, "dog")  # not a manager
        assert "Biscuit" not in text
        audit = [r.action for r in await bot.memory.audit.latest(w.guild.id)]
        assert audit.count("memory.search") == 2


def test_doctor_says_whether_recall_is_on(cli_env, tmp_path: Path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "bot", "doctor", "--skip-model", "--skip-token"],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "long-term recall: on (SQLite full-text search, FTS5)" in proc.stdout


# ---- long turns: an excerpt around the match -----------------------------------------------

RAMBLE = (
    "So yesterday was a long one, let me tell you the whole story from the start. We left the "
    "house around seven, stopped for coffee at the place near the roundabout, and then spent "
    "most of the morning stuck behind a tractor on the old coast road. By the time we reached "
    "the cabin it was raining sideways and the gutters were overflowing again. "
)
FACT = (
    "Oh and before I forget: the spare key for the cabin is hidden inside the green watering can."
)
REST = (
    " Anyway, after that we lit the stove, dried our socks, played cards until midnight and "
    "argued about whether the board game rules allow trading during the night phase, which "
    "they obviously do not, whatever my cousin says about the expansion pack and its notes."
)


async def test_a_fact_inside_a_long_message_is_recalled_as_an_excerpt(
    memory: Memory, settings_factory, llama_tokenizer
):
    """Issue 23: a fact inside a 300-token message said 120 turns earlier is in the prompt of a
    question about it at CONTEXT_TOKENS=768 (recall budget 76 tokens: the turn alone is 300)."""
    from bot.prompt import RECALL_HEADING

    count = CountingEngine(llama_tokenizer).count_tokens
    long = RAMBLE + RAMBLE + FACT + REST + RAMBLE
    assert 290 <= count(long) <= 330
    await fill(memory, 5, 4)
    said = await memory.turns.add(
        5, "user", long, name="bob", guild_id=1, author_id=8, tokens=count(long)
    )
    await fill(memory, 5, 120, start=4)
    question = await memory.turns.add(
        5, "user", "where is the spare key hidden?", name="ann", guild_id=1, author_id=7
    )
    settings = settings_factory(CONTEXT_TOKENS=768, MAX_NEW_TOKENS=128)
    conv = conversations(settings, memory, llama_tokenizer)
    assert conv.recall_budget(conv.settings) == 76 < count(long)
    job = await conv.prepare(5, 1, reply_to=question)
    assert job is not None
    assert said not in {t.id for t in job.prompt.turns}  # far outside the window...
    shown = [t for t in job.prompt.recalled if t.id == said]
    assert shown and "green watering can" in shown[0].content  # ...recalled around the match
    assert shown[0].content != long and "…" in shown[0].content
    text = job.prompt.text
    start = text.index("### Input:\n" + RECALL_HEADING)
    block = text[start : text.index("### Response:\n", start)]
    line = next(ln for ln in block.splitlines() if "watering can" in ln)
    assert "ago] bob: " in line  # the speaker and how long ago
    assert count(block) <= conv.recall_budget(conv.settings)  # the excerpt fits the budget
    assert len(llama_tokenizer(text).input_ids) <= job.prompt.tokens <= 768 - 128
