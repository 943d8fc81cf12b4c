"""The one test world every Discord-facing test starts from.

A guild ("Test Guild") on a running fake Discord with two channels and the people the tests
talk about: plain members, managers (Manage Server), an owner listed in ``OWNER_IDS`` only,
and a member carrying a ``muted`` role. Built by :func:`build_world`; the ``fake`` and
``world`` fixtures in ``tests/conftest.py`` hand it to tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.fake_discord import FakeChannel, FakeDiscord, FakeGuild, FakeRole, FakeUser

if TYPE_CHECKING:
    from bot.settings import Settings


@dataclass
class World:
    fake: FakeDiscord
    guild: FakeGuild
    general: FakeChannel
    other: FakeChannel
    alice: FakeUser  # plain members
    bob: FakeUser
    admin: FakeUser  # has Manage Server
    admin2: FakeUser  # has Manage Server too
    owner: FakeUser  # in OWNER_IDS (see `settings`), no Manage Server
    muted: FakeRole
    carol: FakeUser  # has the `muted` role

    def settings(self, tmp_path: Path, model: Path | str = "scripted", **env: str) -> Settings:
        """Bot settings for this world: `tests.bot_harness.bot_settings` with OWNER_IDS set."""
        from tests.bot_harness import bot_settings

        return bot_settings(tmp_path, model, OWNER_IDS=str(self.owner.id), **env)


def build_world(fake: FakeDiscord) -> World:
    """Populate `fake` with the shared world (before any client connects)."""
    guild = fake.add_guild("Test Guild")
    general = fake.add_channel(guild.id, "general")
    other = fake.add_channel(guild.id, "other")
    alice = fake.add_member(guild.id, "alice").user
    bob = fake.add_member(guild.id, "bob").user
    admin = fake.add_member(guild.id, "admin", permissions=["manage_guild"]).user
    admin2 = fake.add_member(guild.id, "admin2", permissions=["manage_guild"]).user
    owner = fake.add_member(guild.id, "owner").user
    muted = fake.add_role(guild.id, "muted")
    carol = fake.add_member(guild.id, "carol", roles=[muted]).user
    return World(fake, guild, general, other, alice, bob, admin, admin2, owner, muted, carol)
