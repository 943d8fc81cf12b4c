"""World building and inspection: creating users, guilds, channels, threads, roles,
members, webhooks and overwrites (dispatching the matching gateway events), computing
permissions as Discord does, and accessors tests read the recorded state with.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from types import EllipsisType
from typing import Any

from tests.fake_discord.common import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    DEFAULT_BOT_PERMISSIONS,
    DEFAULT_EVERYONE_PERMISSIONS,
    THREAD_TYPES,
    VIEW_CHANNEL,
    ChannelType,
    Intent,
    PermissionLike,
    _opt_str,
    permission_value,
)
from tests.fake_discord.models import (
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    FakeWebhook,
    InteractionHandle,
    RecordedRequest,
    UserLike,
)


class StateMixin:
    """World building, permissions and accessors; mixed into :class:`FakeDiscord`."""

    # ---- world building (sync; dispatches to connected sessions) ---------------------------

    def add_user(
        self,
        username: str,
        *,
        bot: bool = False,
        global_name: str | None = None,
        id: int | None = None,
    ) -> FakeUser:
        user = FakeUser(
            id=id or self.snowflake(), username=username, bot=bot, global_name=global_name
        )
        self.users[user.id] = user
        return user

    def add_guild(
        self,
        name: str = "Test Guild",
        *,
        owner: FakeUser | None = None,
        everyone_permissions: PermissionLike = DEFAULT_EVERYONE_PERMISSIONS,
        bot_permissions: PermissionLike = DEFAULT_BOT_PERMISSIONS,
        id: int | None = None,
    ) -> FakeGuild:
        """A guild the bot is in: @everyone role, a managed bot role, the owner and the bot as
        members.  Added while connected, it arrives as GUILD_CREATE (the bot "joined")."""
        owner = owner or self.add_user(f"{name}-owner")
        guild = FakeGuild(id=id or self.snowflake(), name=name, owner_id=owner.id)
        self.guilds[guild.id] = guild
        guild.roles[guild.id] = FakeRole(
            guild.id, guild.id, "@everyone", permission_value(everyone_permissions)
        )
        bot_role = FakeRole(
            self.snowflake(), guild.id, self.bot_user.username, permission_value(bot_permissions),
            position=1, managed=True, bot_id=self.bot_user.id,
        )  # fmt: skip
        guild.roles[bot_role.id] = bot_role
        guild.members[owner.id] = FakeMember(owner, guild.id)
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, guild.id, [bot_role.id])
        self._dispatch("GUILD_CREATE", self._guild_payload(guild), Intent.GUILDS)
        return guild

    def bot_role(self, guild_id: int) -> FakeRole:
        return next(r for r in self.guilds[guild_id].roles.values() if r.bot_id == self.bot_user.id)

    def add_channel(
        self,
        guild_id: int,
        name: str,
        type: int = ChannelType.GUILD_TEXT,
        *,
        parent_id: int | None = None,
        permission_overwrites: Sequence[dict[str, Any]] = (),
        topic: str | None = None,
        nsfw: bool = False,
        owner: UserLike | None = None,
        id: int | None = None,
    ) -> FakeChannel:
        """A guild channel; thread types (10/11/12) need ``parent_id`` and go in ``threads``.
        ``id``: a given id (a thread started from a message has that message's id)."""
        guild = self.guilds[guild_id]
        if type in THREAD_TYPES and parent_id is None:
            raise ValueError("a thread needs parent_id")
        channel = FakeChannel(
            id=id or self.snowflake(), type=type, guild_id=guild_id, name=name, parent_id=parent_id,
            position=len(guild.channel_ids), topic=topic, nsfw=nsfw,
            permission_overwrites=[dict(o) for o in permission_overwrites],
            owner_id=self._user_id(owner) if owner is not None else (
                self.bot_user.id if type in THREAD_TYPES else None),
        )  # fmt: skip
        self.channels[channel.id] = channel
        guild.channel_ids.append(channel.id)
        event = "THREAD_CREATE" if channel.is_thread else "CHANNEL_CREATE"
        self._dispatch(event, channel.to_payload(), Intent.GUILDS)
        return channel

    def add_thread(
        self,
        parent_id: int,
        name: str,
        *,
        private: bool = False,
        owner: UserLike | None = None,
        id: int | None = None,
    ) -> FakeChannel:
        parent = self.channels[parent_id]
        assert parent.guild_id is not None
        kind = ChannelType.PRIVATE_THREAD if private else ChannelType.PUBLIC_THREAD
        return self.add_channel(
            parent.guild_id, name, kind, parent_id=parent_id, owner=owner, id=id
        )

    def add_role(
        self,
        guild_id: int,
        name: str,
        permissions: PermissionLike = 0,
        *,
        mentionable: bool = False,
        color: int = 0,
        hoist: bool = False,
    ) -> FakeRole:
        guild = self.guilds[guild_id]
        role = FakeRole(
            self.snowflake(), guild_id, name, permission_value(permissions),
            position=len(guild.roles), color=color, hoist=hoist, mentionable=mentionable,
        )  # fmt: skip
        guild.roles[role.id] = role
        self._dispatch(
            "GUILD_ROLE_CREATE",
            {"guild_id": str(guild_id), "role": role.to_payload()},
            Intent.GUILDS,
        )
        return role

    def add_member(
        self,
        guild_id: int,
        user: FakeUser | str,
        *,
        roles: Sequence[FakeRole | int] = (),
        nick: str | None = None,
        global_name: str | None = None,
        permissions: PermissionLike | None = None,
    ) -> FakeMember:
        """Add a member (a new user when given a name).  ``permissions`` is a shortcut that
        gives the member a dedicated role with exactly those permissions.  ``nick`` is the
        guild nickname, ``global_name`` the user's display name (set on the user); any text
        is taken as is (newlines, ``### Response:``...), as a hostile name would be."""
        guild = self.guilds[guild_id]
        if isinstance(user, str):
            user = self.add_user(user)
        if global_name is not None:
            user.global_name = global_name
        role_ids = [r.id if isinstance(r, FakeRole) else int(r) for r in roles]
        if permissions is not None:
            role_ids.append(self.add_role(guild_id, f"{user.username}-perms", permissions).id)
        member = FakeMember(user, guild_id, role_ids, nick)
        guild.members[user.id] = member
        payload = member.to_payload() | {"guild_id": str(guild_id)}
        self._dispatch("GUILD_MEMBER_ADD", payload, Intent.GUILD_MEMBERS)
        return member

    def update_member(
        self,
        guild_id: int,
        user: UserLike,
        *,
        nick: str | None | EllipsisType = ...,
        global_name: str | None | EllipsisType = ...,
    ) -> FakeMember:
        """Change a member's guild nickname and/or their user's global display name (None
        clears it; leave a keyword out to keep it) and dispatch GUILD_MEMBER_UPDATE, as
        Discord does (discord.py updates its cached member and user from it).  Later
        MESSAGE_CREATEs carry the new names in ``member.nick`` / ``author.global_name``."""
        member = self.guilds[guild_id].members[self._user_id(user)]
        if nick is not ...:
            member.nick = nick
        if global_name is not ...:
            member.user.global_name = global_name
        payload = member.to_payload() | {"guild_id": str(guild_id)}
        self._dispatch("GUILD_MEMBER_UPDATE", payload, Intent.GUILD_MEMBERS)
        return member

    def set_permission_overwrite(
        self,
        channel_id: int,
        target: FakeRole | FakeMember | FakeUser | int,
        *,
        allow: PermissionLike = 0,
        deny: PermissionLike = 0,
    ) -> None:
        """Set (replace) a channel overwrite for a role or member; dispatches CHANNEL_UPDATE."""
        channel = self.channels[channel_id]
        assert channel.guild_id is not None and not channel.is_thread
        guild = self.guilds[channel.guild_id]
        target_id = target.id if not isinstance(target, int) else target
        kind = 0 if target_id in guild.roles else 1
        channel.permission_overwrites = [
            o for o in channel.permission_overwrites if int(o["id"]) != target_id
        ]
        channel.permission_overwrites.append(
            {"id": str(target_id), "type": kind, "allow": str(permission_value(allow)),
             "deny": str(permission_value(deny))}
        )  # fmt: skip
        self._dispatch("CHANNEL_UPDATE", channel.to_payload(), Intent.GUILDS)

    def deny_bot_permissions(self, channel_id: int, *permissions: str) -> None:
        """E.g. ``fake.deny_bot_permissions(ch.id, "manage_webhooks")``: a member overwrite."""
        self.set_permission_overwrite(channel_id, self.bot_user, deny=permissions)

    def dm_channel(self, user: UserLike) -> FakeChannel:
        """The DM channel between the bot and ``user`` (created on first use)."""
        uid = self._user_id(user)
        if uid not in self._dm_by_user:
            channel = FakeChannel(
                id=self.snowflake(), type=ChannelType.DM, recipients=[self.users[uid]]
            )
            self.channels[channel.id] = channel
            self._dm_by_user[uid] = channel.id
        return self.channels[self._dm_by_user[uid]]

    def add_webhook(
        self, channel_id: int, name: str = "Captain Hook", *, creator: FakeUser | None = None
    ) -> FakeWebhook:
        """A webhook someone else (by default the guild owner) made in a channel."""
        channel = self.channels[channel_id]
        assert channel.guild_id is not None
        creator = creator or self.users[self.guilds[channel.guild_id].owner_id]
        return self._create_webhook(channel, name, creator, None)

    def delete_webhook(self, webhook_id: int) -> None:
        hook = self.webhooks.pop(webhook_id)
        self._dispatch(
            "WEBHOOKS_UPDATE",
            {"guild_id": _opt_str(hook.guild_id), "channel_id": str(hook.channel_id)},
            Intent.GUILD_WEBHOOKS,
        )

    # ---- permissions ----------------------------------------------------------------------

    def compute_permissions(
        self, guild_id: int, user_id: int, channel_id: int | None = None
    ) -> int:
        """Discord's algorithm: base role permissions, then @everyone/role/member overwrites."""
        guild = self.guilds[guild_id]
        if user_id == guild.owner_id:
            return ALL_PERMISSIONS
        member = guild.members.get(user_id)
        if member is None:
            return 0
        perms = guild.everyone.permissions
        for rid in member.roles:
            perms |= guild.roles[rid].permissions if rid in guild.roles else 0
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        if channel_id is None:
            return perms
        channel = self.channels[channel_id]
        if channel.is_thread and channel.parent_id is not None:
            channel = self.channels[channel.parent_id]
        overwrites = {int(o["id"]): o for o in channel.permission_overwrites}

        def apply(perms: int, allow: int, deny: int) -> int:
            return (perms & ~deny) | allow

        if guild.id in overwrites:
            o = overwrites[guild.id]
            perms = apply(perms, int(o["allow"]), int(o["deny"]))
        allow = deny = 0
        for rid in member.roles:
            if rid in overwrites:
                allow |= int(overwrites[rid]["allow"])
                deny |= int(overwrites[rid]["deny"])
        perms = apply(perms, allow, deny)
        if user_id in overwrites:
            o = overwrites[user_id]
            perms = apply(perms, int(o["allow"]), int(o["deny"]))
        if not perms & VIEW_CHANNEL:
            return 0
        return perms

    def bot_permissions(self, channel_id: int) -> int:
        channel = self.channels[channel_id]
        if channel.guild_id is None:
            return permission_value(
                ["view_channel", "send_messages", "read_message_history", "embed_links",
                 "attach_files", "add_reactions", "use_application_commands"]
            )  # fmt: skip
        return self.compute_permissions(channel.guild_id, self.bot_user.id, channel_id)

    # ---- accessors ------------------------------------------------------------------------

    def channel_messages(
        self, channel_id: int, *, include_deleted: bool = False
    ) -> list[FakeMessage]:
        """Non-ephemeral messages of a channel, oldest first, in their current (edited) state."""
        msgs = [self.messages[m] for m in self._channel_messages.get(channel_id, [])]
        return [m for m in msgs if include_deleted or not m.deleted]

    def last_message(self, channel_id: int) -> FakeMessage | None:
        msgs = self.channel_messages(channel_id)
        return msgs[-1] if msgs else None

    def get_message(self, message_id: int) -> FakeMessage:
        return self.messages[message_id]

    def find_requests(
        self, method: str | None = None, path: str | None = None
    ) -> list[RecordedRequest]:
        """Recorded REST calls; ``path`` is a regex (``{name}`` placeholders allowed), fullmatched."""
        pattern = self._compile_path(path) if path is not None else None
        return [
            r for r in self.requests
            if (method is None or r.method == method.upper())
            and (pattern is None or pattern.fullmatch(r.path))
        ]  # fmt: skip

    def commands(self, guild_id: int | None = None) -> list[dict[str, Any]]:
        """The registered command definitions (global, or one guild's)."""
        return copy.deepcopy(self._commands.get(guild_id, []))

    def interactions(self) -> list[InteractionHandle]:
        return list(self._interactions.values())
