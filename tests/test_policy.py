"""The channel policy (`bot.policy.resolve`) on a real SQLite memory, without Discord.

Threads inherit their parent's mode, persona and settings unless they have their own; the access
rule blocks users and roles and keeps the bot to a server's allow-list, a thread counting as its
parent channel.
"""

from __future__ import annotations

from collections.abc import Callable

from bot.memory import Memory
from bot.policy import (
    BLOCKED,
    NOT_SERVED,
    SWITCHED_OFF,
    Asker,
    Place,
    resolve,
)
from bot.settings import Settings

GUILD, CHANNEL, THREAD, OTHER = 1, 10, 11, 20


async def test_a_thread_takes_its_parents_mode_persona_and_settings(
    memory: Memory, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory(TEMPERATURE="0.3", TOP_K="40")
    await memory.places.update_guild(GUILD, settings={"top_k": 10}, default_persona="Sable")
    await memory.places.update_channel(
        CHANNEL, GUILD, mode="always", persona="Grumbold", settings={"temperature": 0.9}
    )
    thread = Place(THREAD, GUILD, parent_id=CHANNEL)

    policy = await resolve(memory, settings, thread)
    assert (policy.mode, policy.persona) == ("always", "Grumbold")
    eff = policy.settings
    assert (eff.values["temperature"], eff.source["temperature"]) == (0.9, "parent channel")
    assert (eff.values["top_k"], eff.source["top_k"]) == (10, "server")
    assert (eff.values["top_p"], eff.source["top_p"]) == (settings.top_p, "default")
    applied = eff.applied(settings)
    assert (applied.temperature, applied.top_k, applied.db_path) == (0.9, 10, settings.db_path)

    # the thread's own choices win over its parent's
    await memory.places.update_channel(
        THREAD, GUILD, mode="mention", persona="Wren", settings={"temperature": 0.1}
    )
    policy = await resolve(memory, settings, thread)
    assert (policy.mode, policy.persona) == ("mention", "Wren")
    assert (policy.settings.values["temperature"], policy.settings.source["temperature"]) == (
        0.1,
        "channel",
    )

    # a channel with nothing of its own: the defaults, and the server's persona
    policy = await resolve(memory, settings, Place(OTHER, GUILD))
    assert (policy.mode, policy.persona, policy.refusal) == ("mention", "Sable", None)


async def test_direct_messages_follow_allow_dms(
    memory: Memory, settings_factory: Callable[..., Settings]
) -> None:
    dm = Place(99, None, direct=True)
    asker = Asker(5)
    assert (await resolve(memory, settings_factory(), dm, asker)).mode == "always"
    policy = await resolve(memory, settings_factory(ALLOW_DMS="false"), dm, asker)
    assert (policy.mode, policy.refusal, policy.refusal_to_speak()) == ("off", None, SWITCHED_OFF)


async def test_access_blocked_users_and_roles_and_the_allow_list(
    memory: Memory, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory()
    here, thread = Place(CHANNEL, GUILD), Place(THREAD, GUILD, parent_id=CHANNEL)
    alice, bob, carol = Asker(100), Asker(200), Asker(300, frozenset({7}))
    await memory.places.set_blocked(GUILD, "user", bob.user_id, True)
    await memory.places.set_blocked(GUILD, "role", 7, True)

    async def refusal(place: Place, asker: Asker) -> str | None:
        return (await resolve(memory, settings, place, asker)).refusal

    assert [await refusal(here, a) for a in (alice, bob, carol)] == [None, BLOCKED, BLOCKED]
    assert (await resolve(memory, settings, here)).refusal is None  # no asker: no decision

    await memory.places.update_guild(GUILD, channel_allowlist=[CHANNEL])
    assert await refusal(here, alice) is None
    assert await refusal(thread, alice) is None  # a thread counts as its parent
    assert await refusal(Place(OTHER, GUILD), alice) == NOT_SERVED
    assert await refusal(Place(OTHER, GUILD), bob) == BLOCKED

    # commands that make the bot speak are also refused where it is switched off
    await memory.places.update_channel(CHANNEL, GUILD, mode="off")
    policy = await resolve(memory, settings, thread, alice)
    assert (policy.mode, policy.refusal, policy.refusal_to_speak()) == ("off", None, SWITCHED_OFF)
