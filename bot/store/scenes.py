"""Scenes (several personas seated in one channel) and swipes (the alternative replies of one
turn, the one shown being the one memory keeps).

`bot.scenes` picks who speaks from a `SceneState`; `bot.discord.swipes` draws the buttons.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.store.db import Store


@dataclass(slots=True)
class SceneMember:
    name: str
    seat: int
    muted: bool = False
    nicknames: list[str] = field(default_factory=list)
    talkativeness: float | None = None  # None: the card's (extensions.talkativeness)


@dataclass(slots=True)
class SceneState:
    """A channel's cast, in seating order, and how the next speaker is chosen."""

    channel_id: int
    guild_id: int | None = None
    policy: str = "natural"  # natural | list | manual
    scenario: str = ""
    next_seat: int = 0  # round robin position (policy `list`)
    manual_next: str | None = None  # who speaks next (policy `manual`)
    members: list[SceneMember] = field(default_factory=list)


@dataclass(slots=True)
class SwipeState:
    """The alternatives of one reply, the one shown now, and who may swipe it."""

    turn_id: int
    shown: int
    alternatives: list[str]
    reply_to: int | None
    requester: int | None


_SCENE_FIELDS = {"policy", "scenario", "next_seat", "manual_next"}


class SceneStore(Store):
    """A channel's scene: its policy and scenario, and its members in seating order."""

    async def get(self, channel_id: int) -> SceneState:
        """The channel's scene (no members when it has none)."""
        row = await self.db.one(
            "SELECT channel_id, guild_id, policy, scenario, next_seat, manual_next FROM scenes "
            "WHERE channel_id = ?",
            (channel_id,),
        )
        if row is None:
            return SceneState(channel_id)
        state = SceneState(*row)
        rows = await self.db.all(
            "SELECT name, seat, muted, nicknames, talkativeness FROM scene_members "
            "WHERE channel_id = ? ORDER BY seat",
            (channel_id,),
        )
        state.members = [SceneMember(r[0], r[1], bool(r[2]), json.loads(r[3]), r[4]) for r in rows]
        return state

    async def update(self, channel_id: int, guild_id: int | None, **changes: Any) -> None:
        """Set policy, scenario, next_seat or manual_next of a channel's scene."""
        if bad := set(changes) - _SCENE_FIELDS:
            raise ValueError(f"unknown scene fields: {sorted(bad)}")
        await self.db.upsert("scenes", {"channel_id": channel_id, "guild_id": guild_id}, changes)

    async def add_member(
        self,
        channel_id: int,
        guild_id: int | None,
        name: str,
        *,
        nicknames: Sequence[str] = (),
        talkativeness: float | None = None,
    ) -> None:
        """Seat `name` last (or update its nicknames and talkativeness if already seated)."""
        await self.update(channel_id, guild_id)
        await self.db.run(
            [
                (
                    "INSERT INTO scene_members (channel_id, name, seat, nicknames, talkativeness) "
                    "VALUES (?, ?, (SELECT COALESCE(MAX(seat), -1) + 1 FROM scene_members "
                    "WHERE channel_id = ?), ?, ?) ON CONFLICT (channel_id, name) DO UPDATE SET "
                    "nicknames = excluded.nicknames, talkativeness = excluded.talkativeness",
                    (channel_id, name, channel_id, json.dumps(list(nicknames)), talkativeness),
                )
            ]
        )

    async def update_member(self, channel_id: int, name: str, *, muted: bool) -> bool:
        """Mute or unmute a member; whether one of that name is seated."""
        return await self.db.changed(
            [
                (
                    "UPDATE scene_members SET muted = ? WHERE channel_id = ? "
                    "AND name = ? COLLATE NOCASE",
                    (int(muted), channel_id, name),
                )
            ]
        )

    async def remove_member(self, channel_id: int, name: str) -> bool:
        """Unseat a member; whether one of that name was seated."""
        return await self.db.changed(
            [
                (
                    "DELETE FROM scene_members WHERE channel_id = ? AND name = ? COLLATE NOCASE",
                    (channel_id, name),
                )
            ]
        )

    async def clear(self, channel_id: int) -> int:
        """Remove the whole scene; returns how many members it had."""
        scene = await self.get(channel_id)
        await self.db.run([("DELETE FROM scenes WHERE channel_id = ?", (channel_id,))])
        return len(scene.members)


class SwipeStore(Store):
    """A reply's alternatives; showing one makes it the turn's text (what the prompt keeps)."""

    async def start(
        self, turn_id: int, content: str, tokens: int | None, *, reply_to: int | None,
        requester: int | None,
    ) -> None:  # fmt: skip
        """Record a reply's first alternative (its text now) and who may swipe it."""
        await self.db.run(
            [
                (
                    "INSERT OR REPLACE INTO swipe_turns (turn_id, shown, reply_to, requester) "
                    "VALUES (?, 0, ?, ?)",
                    (turn_id, reply_to, requester),
                ),
                (
                    "INSERT OR REPLACE INTO swipes (turn_id, idx, content, tokens) "
                    "VALUES (?, 0, ?, ?)",
                    (turn_id, content, tokens),
                ),
            ]
        )

    async def get(self, turn_id: int) -> SwipeState | None:
        """The reply's alternatives and the one shown (None: it is settled, or never swiped)."""
        row = await self.db.one(
            "SELECT shown, reply_to, requester FROM swipe_turns WHERE turn_id = ?", (turn_id,)
        )
        if row is None:
            return None
        rows = await self.db.all(
            "SELECT content FROM swipes WHERE turn_id = ? ORDER BY idx", (turn_id,)
        )
        return SwipeState(turn_id, row[0], [r[0] for r in rows], row[1], row[2])

    async def add(self, turn_id: int, content: str, tokens: int | None) -> int:
        """Store another alternative and show it (the turn's text becomes it); its index."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT COALESCE(MAX(idx), -1) + 1 FROM swipes WHERE turn_id = ?", (turn_id,)
            )
            (idx,) = await cur.fetchone()  # type: ignore[misc]
            await conn.execute(
                "INSERT INTO swipes (turn_id, idx, content, tokens) VALUES (?, ?, ?, ?)",
                (turn_id, idx, content, tokens),
            )
            await conn.execute("UPDATE swipe_turns SET shown = ? WHERE turn_id = ?", (idx, turn_id))
            await conn.execute(
                "UPDATE turns SET content = ?, tokens = ? WHERE id = ?", (content, tokens, turn_id)
            )
        return int(idx)

    async def show(self, turn_id: int, idx: int) -> str | None:
        """Show alternative `idx`: the turn's text becomes it (what memory keeps). Its text."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "SELECT content, tokens FROM swipes WHERE turn_id = ? AND idx = ?", (turn_id, idx)
            )
            row = await cur.fetchone()
            if row is None:
                return None
            await conn.execute("UPDATE swipe_turns SET shown = ? WHERE turn_id = ?", (idx, turn_id))
            await conn.execute(
                "UPDATE turns SET content = ?, tokens = ? WHERE id = ?", (row[0], row[1], turn_id)
            )
        return str(row[0])

    async def end(self, turn_id: int) -> None:
        """The reply is settled as it is now (e.g. `/continue` extended it)."""
        await self.db.run([("DELETE FROM swipe_turns WHERE turn_id = ?", (turn_id,))])
