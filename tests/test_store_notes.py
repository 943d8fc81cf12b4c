"""The notes, summaries and members' cards stores (`bot.store.notes`) on a real SQLite file."""

from __future__ import annotations

from bot.memory import Memory


async def test_notes_keep_their_order_and_remove_by_position(memory: Memory):
    for text in ("one", "two", "three"):
        await memory.notes.add(7, text, guild_id=1, author_id=2)
    await memory.notes.add(8, "elsewhere", guild_id=1, author_id=2)
    assert [n.text for n in await memory.notes.list(7)] == ["one", "two", "three"]
    gone = await memory.notes.remove(7, 2)
    assert gone is not None and gone.text == "two"
    assert [n.text for n in await memory.notes.list(7)] == ["one", "three"]
    assert await memory.notes.remove(7, 3) is None and await memory.notes.remove(7, 0) is None
    assert [n.text for n in await memory.notes.list(8)] == ["elsewhere"]


async def test_a_summary_is_replaced_and_goes_with_forget_and_clear(memory: Memory):
    first = await memory.turns.add(5, "user", "hello", name="Al")
    last = await memory.turns.add(5, "assistant", "hi")
    await memory.summaries.put(5, "Al said hello.", first, first)
    await memory.summaries.put(5, "Al said hello; the bot answered.", first, last)
    stored = await memory.summaries.get(5)
    assert stored is not None
    assert (stored.text, stored.first_id, stored.last_id) == (
        "Al said hello; the bot answered.",
        first,
        last,
    )
    await memory.turns.forget(5)
    assert await memory.summaries.get(5) is None
    await memory.summaries.put(5, "again", first, last)
    await memory.turns.clear(5)
    assert await memory.summaries.get(5) is None


async def test_member_cards_are_per_place(memory: Memory):
    await memory.member_cards.set(100, 1, "a bard")
    await memory.member_cards.set(100, 1, "a half-elf bard")
    await memory.member_cards.set(200, 1, "a wizard")
    assert await memory.member_cards.of(100, [1, 2]) == {1: "a half-elf bard"}
    assert await memory.member_cards.get(200, 1) == "a wizard"
    assert await memory.member_cards.clear(100, 1)
    assert not await memory.member_cards.clear(100, 1)
    assert await memory.member_cards.of(100, [1]) == {}
