"""`bot.bench_compare`: engines side by side on the same conversations, none asked twice.

A server such as llama-server keeps each slot's last prompt; if a later round asked the same
conversations again, that column would answer from its cache and win on time to first token.
"""

from __future__ import annotations

from bot import bench_compare
from bot.benchmark import stories
from tests.bot_harness import ScriptedEngine


async def test_every_round_asks_new_conversations_of_every_column():
    engines = [ScriptedEngine(lambda p: "x " * 8) for _ in range(2)]
    columns = await bench_compare.compare(
        [("a", engines[0]), ("b", engines[1])], stories, tokens=4, channels=3, rounds=2
    )
    for engine in engines:
        asked = engine.prompts[1:]  # the first is the short warm-up
        assert len(asked) == 2 * (3 + 1)
        assert len(set(asked)) == len(asked)
    assert engines[0].prompts[1:] == engines[1].prompts[1:]  # the columns are asked alike
    assert [len(c.aggregate_tps) for c in columns] == [2, 2]
