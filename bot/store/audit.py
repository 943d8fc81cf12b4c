"""The audit log: who changed what, where, from what to what (`/admin audit` lists it).

`AuditLog.write` is the one writer; the Discord layer's `bot.discord.checks.audit` fills it from an
interaction, so every command audits the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from bot.store.db import Store


@dataclass(slots=True)
class AuditRow:
    id: int
    guild_id: int | None
    channel_id: int | None
    user_id: int
    action: str
    old: str | None
    new: str | None
    created_at: float


def _text(value: Any) -> str | None:
    """A value as the log keeps it: text as is, anything else as JSON."""
    return None if value is None else value if isinstance(value, str) else json.dumps(value)


class AuditLog(Store):
    """Append-only rows, read newest first per server."""

    async def write(
        self,
        user_id: int,
        action: str,
        *,
        guild_id: int | None = None,
        channel_id: int | None = None,
        old: Any = None,
        new: Any = None,
    ) -> None:
        await self.db.run(
            [
                (
                    "INSERT INTO audit (guild_id, channel_id, user_id, action, old, new, created_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (guild_id, channel_id, user_id, action, _text(old), _text(new), time.time()),
                ),
            ]
        )

    async def latest(self, guild_id: int | None, limit: int = 20) -> list[AuditRow]:
        """A server's newest `limit` rows, newest first."""
        rows = await self.db.all(
            "SELECT id, guild_id, channel_id, user_id, action, old, new, created_at FROM audit "
            "WHERE guild_id IS ? ORDER BY id DESC LIMIT ?",
            (guild_id, limit),
        )
        return [AuditRow(*row) for row in rows]
