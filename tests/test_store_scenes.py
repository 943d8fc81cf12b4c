"""Scenes and swipes on a real SQLite file."""

from __future__ import annotations

import pytest

from bot.memory import Memory
from bot.store.scenes import SceneMember, SceneState


async def test_scene_cast_and_policy(memory: Memory):
    assert await memory.scenes.get(1) == SceneState(1)  # no scene: no members
    await memory.scenes.add_member(1, 9, "Sable", nicknames=["Sab"])
    await memory.scenes.add_member(1, 9, "Grumbold", talkativeness=0.3)
    await memory.scenes.add_member(1, 9, "sable", nicknames=["S"])  # seated already: updated
    await memory.scenes.update(1, 9, policy="list", scenario="A tavern.", next_seat=1)
    scene = await memory.scenes.get(1)
    assert (scene.guild_id, scene.policy, scene.scenario, scene.next_seat) == (
        9,
        "list",
        "A tavern.",
        1,
    )
    assert scene.members == [
        SceneMember("Sable", 0, False, ["S"], None),
        SceneMember("Grumbold", 1, False, [], 0.3),
    ]
    assert await memory.scenes.update_member(1, "GRUMBOLD", muted=True) is True
    assert await memory.scenes.update_member(1, "Nobody", muted=True) is False
    assert [m.muted for m in (await memory.scenes.get(1)).members] == [False, True]
    with pytest.raises(ValueError, match="members"):
        await memory.scenes.update(1, 9, members=[])
    assert await memory.scenes.remove_member(1, "sable") is True
    assert await memory.scenes.remove_member(1, "sable") is False
    await memory.scenes.add_member(1, 9, "Wren")  # seated after the last one
    assert [(m.name, m.seat) for m in (await memory.scenes.get(1)).members] == [
        ("Grumbold", 1),
        ("Wren", 2),
    ]
    assert await memory.scenes.clear(1) == 2
    assert await memory.scenes.get(1) == SceneState(1)


async def test_swipes_show_what_memory_keeps(memory: Memory):
    question = await memory.turns.add(3, "user", "tell me a joke")
    reply = await memory.turns.add(3, "assistant", "first", tokens=1)
    assert await memory.swipes.get(reply) is None  # never swiped
    await memory.swipes.start(reply, "first", 1, reply_to=question, requester=9)
    assert await memory.swipes.add(reply, "second", 2) == 1
    assert await memory.swipes.add(reply, "third", 3) == 2
    turn = await memory.turns.get(reply)
    assert (turn.content, turn.tokens) == ("third", 3)  # the one shown is the one kept
    state = await memory.swipes.get(reply)
    assert (state.shown, state.alternatives) == (2, ["first", "second", "third"])
    assert (state.reply_to, state.requester) == (question, 9)
    assert await memory.swipes.show(reply, 0) == "first"
    assert await memory.swipes.show(reply, 7) is None  # no such alternative: nothing changes
    turn = await memory.turns.get(reply)
    assert (turn.content, turn.tokens, (await memory.swipes.get(reply)).shown) == ("first", 1, 0)
    await memory.swipes.end(reply)  # settled: no more swiping, the text stays
    assert await memory.swipes.get(reply) is None
    assert (await memory.turns.get(reply)).content == "first"
