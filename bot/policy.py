"""The channel policy: for one channel, its mode, persona, generation settings and access rule.

The one place that decides how a channel behaves. A thread has its own memory but takes its
parent channel's mode, persona, settings and scene unless it has its own: that inheritance is
done here only. The access rule (blocked users and roles, a server's channel allow-list, the
ALLOWED_ROLES a member needs, where a thread counts as its parent) is here too, so messages and
commands follow the same rules, and so is the roleplay convention that an out-of-character line
(`out_of_character`) is stored hidden and not answered.

Nothing here knows discord.py: the Discord layer describes the channel as a `Place` and the
member as an `Asker`; the console and the tests can do the same.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bot.memory import Memory
from bot.settings import TUNABLE, Settings
from bot.store.places import ChannelState, GuildState

BLOCKED = "Sorry, you can't use my commands in this server."
NOT_SERVED = "I'm not serving this channel."
SWITCHED_OFF = "I'm switched off in this channel."
NO_ALLOWED_ROLE = "Sorry, only members with one of the roles this server allows may talk to me."

#: A channel's modes, the one list (`/admin channel`, the store's CHECK since schema v7):
#: off: never answers, stores nothing; mention: answers when addressed (mentioned, replied to,
#: named by wake words); always: every message; threads: as mention, but an addressed message
#: opens a public thread and the conversation goes on there (a thread of a `threads` channel
#: answers every message: it is that conversation).
MODES: tuple[str, ...] = ("off", "mention", "always", "threads")


@dataclass(frozen=True, slots=True)
class Place:
    """A channel as the policy sees it."""

    channel_id: int
    guild_id: int | None = None
    parent_id: int | None = None  # a thread's parent channel
    direct: bool = False  # a DM or group DM


@dataclass(frozen=True, slots=True)
class Asker:
    """Who is asking: a user and, in a server, the ids of their roles."""

    user_id: int
    role_ids: frozenset[int] = frozenset()


@dataclass(slots=True)
class Effective:
    """Generation settings in force for one channel, and where each came from."""

    values: dict[str, Any]
    source: dict[str, str]  # default | server | parent channel | channel

    def applied(self, settings: Settings) -> Settings:
        """`settings` with these values in force."""
        return replace(settings, **self.values)


@dataclass(slots=True)
class ChannelPolicy:
    """How the bot behaves in one channel, for one asker."""

    mode: str  # one of MODES; in a thread, `threads` reads as `always`
    persona: str | None  # the persona's name; None: the default assistant
    settings: Effective
    refusal: str | None = None  # why the asker may not use the bot here; None: allowed

    def refusal_to_speak(self) -> str | None:
        """Why a command that makes the bot speak is refused: access, or the channel is off."""
        return self.refusal or (SWITCHED_OFF if self.mode == "off" else None)


def effective_settings(
    settings: Settings,
    guild: GuildState | None,
    channel: ChannelState,
    parent: ChannelState | None = None,
) -> Effective:
    """Defaults, then the server's, then a thread's parent channel's, then the channel's own."""
    values = {name: getattr(settings, name) for name in TUNABLE}
    source = dict.fromkeys(TUNABLE, "default")
    for scope, overrides in (
        ("server", guild.settings if guild else {}),
        ("parent channel", parent.settings if parent else {}),
        ("channel", channel.settings),
    ):
        for name, value in overrides.items():
            if name in TUNABLE:  # a list of ids comes back from JSON as a list
                value = tuple(value) if isinstance(value, list) else value
                values[name], source[name] = value, scope
    return Effective(values, source)


def out_of_character(text: str, prefixes: str) -> bool:
    """Whether `text` is an out-of-character line: it starts with one of the comma-separated
    `prefixes` (OOC_PREFIXES, e.g. "((,//,OOC:"), in any case, after leading blanks; "none"
    (an empty setting cannot be written in `.env` or Discord) means no line is."""
    if prefixes.strip().casefold() == "none":
        return False
    start = text.lstrip().casefold()
    return any(start.startswith(p.strip().casefold()) for p in prefixes.split(",") if p.strip())


def _mode(
    settings: Settings, place: Place, channel: ChannelState, parent: ChannelState | None
) -> str:
    if place.direct:
        return "always" if settings.allow_dms else "off"
    mode = channel.mode or (parent.mode if parent else None) or "mention"
    if mode == "threads" and place.parent_id is not None:
        return "always"  # a thread of a `threads` channel is its conversation
    return mode


async def _refusal(
    memory: Memory, guild: GuildState | None, place: Place, asker: Asker, effective: Effective
) -> str | None:
    if guild is None:
        return None
    users, roles = await memory.places.blocked(guild.guild_id)
    if asker.user_id in users or asker.role_ids & set(roles):
        return BLOCKED
    here = {place.channel_id, place.parent_id}
    if guild.channel_allowlist and not here & set(guild.channel_allowlist):
        return NOT_SERVED
    allowed = set(effective.values.get("allowed_roles") or ())
    if allowed and not asker.role_ids & allowed:
        return NO_ALLOWED_ROLE
    return None


async def resolve(
    memory: Memory, settings: Settings, place: Place, asker: Asker | None = None
) -> ChannelPolicy:
    """The policy in force at `place`; with `asker`, whether they may use the bot there."""
    channel = await memory.places.channel(place.channel_id)
    parent = await memory.places.channel(place.parent_id) if place.parent_id else None
    guild = await memory.places.guild(place.guild_id) if place.guild_id else None
    persona = (
        channel.persona
        or (parent.persona if parent else None)
        or (guild.default_persona if guild else None)
    )
    effective = effective_settings(settings, guild, channel, parent)
    return ChannelPolicy(
        mode=_mode(settings, place, channel, parent),
        persona=persona,
        settings=effective,
        refusal=await _refusal(memory, guild, place, asker, effective) if asker else None,
    )


async def scene_channel(memory: Memory, place: Place) -> int:
    """The channel whose scene speaks at `place`: its own cast, else a thread's parent's
    (a thread follows its parent's scene as it follows its mode and persona)."""
    if place.parent_id is None or (await memory.scenes.get(place.channel_id)).members:
        return place.channel_id
    parent = await memory.scenes.get(place.parent_id)
    return place.parent_id if parent.members else place.channel_id
