"""Messages: test-driven user events (post, edit, delete, react, type), the message
payloads and their validation as Discord does it (mentions, allowed_mentions, length
limits, attachments), and the REST message handlers.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import re
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tests.fake_discord.common import (
    MAX_CONTENT_LENGTH,
    MAX_EMBED_DESCRIPTION,
    MENTION_EVERYONE,
    ApiError,
    ChannelType,
    Intent,
    MessageFlag,
    _bad_len,
    _field_error,
    _form_error,
    _iso,
    _max_len,
    _not_found,
    _now,
    _opt_str,
    permission_value,
)
from tests.fake_discord.gateway import _Session
from tests.fake_discord.models import (
    FakeAttachment,
    FakeChannel,
    FakeFile,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    UserLike,
    _Call,
)

_MENTION_USER = re.compile(r"<@!?(\d+)>")
_MENTION_ROLE = re.compile(r"<@&(\d+)>")


class MessagesMixin:
    """User-side message events and the REST message routes; mixed into :class:`FakeDiscord`."""

    # ---- test-driven events ---------------------------------------------------------------

    async def user_message(
        self,
        channel_id: int,
        author: UserLike,
        content: str = "",
        *,
        mentions: Sequence[UserLike] = (),
        mention_roles: Sequence[FakeRole | int] = (),
        reply_to: FakeMessage | int | None = None,
        mention_author: bool = True,
        attachments: Sequence[FakeFile] = (),
        embeds: Sequence[dict[str, Any]] = (),
        at: datetime | None = None,
    ) -> FakeMessage:
        """A user posts; dispatches MESSAGE_CREATE.  Mentions are parsed from ``<@id>`` /
        ``<@&id>`` / @everyone in the content, plus the explicit ``mentions``/``mention_roles``;
        a reply mentions the replied-to author unless ``mention_author=False``.

        The content goes out exactly as given (CR, NUL, U+2028, zero-width characters...).
        Posted while no bot session is connected, the message is only stored (history has
        it; ``delivered`` is 0).  ``at`` (an aware datetime) backdates it: its snowflake and
        timestamp are that time and history orders it among the others by id."""
        channel = self.channels[channel_id]
        user = self.users[self._user_id(author)]
        if channel.guild_id is not None and user.id not in self.guilds[channel.guild_id].members:
            raise ValueError(f"{user.username} is not a member of guild {channel.guild_id}")
        ref = self._resolve_message(reply_to) if reply_to is not None else None
        ident = self.snowflake() if at is None else self.snowflake.at(at, self.messages)
        msg = FakeMessage(
            id=ident, channel_id=channel.id, guild_id=channel.guild_id, author=user,
            content=content, embeds=[dict(e) for e in embeds], type=19 if ref else 0,
            reference_id=ref.id if ref else None,
        )  # fmt: skip
        msg.attachments = [self._store_attachment(channel.id, f) for f in attachments]
        am: dict[str, Any] = {
            "parse": ["users", "roles", "everyone"],
            "replied_user": mention_author,
        }
        self._compute_mentions(msg, am)
        for extra in mentions:
            if self._user_id(extra) not in msg.mentions:
                msg.mentions.append(self._user_id(extra))
        for role in mention_roles:
            rid = role.id if isinstance(role, FakeRole) else int(role)
            if rid not in msg.mention_roles:
                msg.mention_roles.append(rid)
        self._post(msg)
        await self._flush()
        return msg

    async def edit_user_message(
        self,
        message: FakeMessage | int,
        content: str | None = None,
        *,
        embeds: Sequence[dict[str, Any]] | None = None,
    ) -> FakeMessage:
        """A user edits their message; dispatches MESSAGE_UPDATE."""
        msg = self._resolve_message(message)
        if content is not None and content != msg.content:
            msg.history.append(msg.content)
            msg.content = content
        if embeds is not None:
            msg.embeds = [dict(e) for e in embeds]
        msg.edited_at = _now()
        self._compute_mentions(msg, {"parse": ["users", "roles", "everyone"]})
        self._dispatch_message("MESSAGE_UPDATE", msg)
        await self._flush()
        return msg

    async def delete_message(self, message: FakeMessage | int) -> None:
        """Someone deletes a message; dispatches MESSAGE_DELETE."""
        self._delete(self._resolve_message(message))
        await self._flush()

    async def add_reaction(self, message: FakeMessage | int, user: UserLike, emoji: str) -> None:
        msg = self._resolve_message(message)
        self._react(msg, self.users[self._user_id(user)], emoji, add=True)
        await self._flush()

    async def user_typing(self, channel_id: int, user: UserLike) -> None:
        channel = self.channels[channel_id]
        data: dict[str, Any] = {
            "channel_id": str(channel_id), "user_id": str(self._user_id(user)),
            "timestamp": int(time.time()),
        }  # fmt: skip
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
            member = self.guilds[channel.guild_id].members.get(self._user_id(user))
            if member is not None:
                data["member"] = member.to_payload()
        intent = Intent.GUILD_MESSAGE_TYPING if channel.guild_id else Intent.DIRECT_MESSAGE_TYPING
        self._dispatch("TYPING_START", data, intent)
        await self._flush()

    # ---- message plumbing -----------------------------------------------------------------

    def _user_id(self, user: UserLike) -> int:
        if isinstance(user, FakeUser | FakeMember):
            return user.id
        return int(user)

    def _resolve_message(self, message: FakeMessage | int) -> FakeMessage:
        return message if isinstance(message, FakeMessage) else self.messages[int(message)]

    def _store_attachment(
        self, channel_id: int, f: FakeFile, *, ephemeral: bool = False
    ) -> FakeAttachment:
        aid = self.snowflake()
        # like the CDN's signed links: ex (expiry), is (issued), hm (signature) in the query
        issued = int(time.time())
        sig = hashlib.sha256(f"{aid}:{issued}".encode()).hexdigest()
        query = f"?ex={issued + 86400:x}&is={issued:x}&hm={sig}&"
        path = f"attachments/{channel_id}/{aid}/{f.filename}"
        att = FakeAttachment(
            id=aid, filename=f.filename, data=f.data, content_type=f.content_type,
            description=f.description, ephemeral=ephemeral,
            url=f"{self.base_url}/{path}{query}", proxy_url=f"{self.base_url}/media/{path}{query}",
        )  # fmt: skip
        self._attachments[aid] = att
        return att

    def _compute_mentions(
        self, msg: FakeMessage, allowed: dict[str, Any] | None, *, check_author: bool = False
    ) -> None:
        """Fill ``mentions``/``mention_roles``/``mention_everyone`` the way Discord does: only
        what the content mentions *and* ``allowed_mentions`` lets through (absent = all)."""
        if allowed is None:
            allowed = {"parse": ["users", "roles", "everyone"], "replied_user": True}
        parse = set(allowed.get("parse") or [])
        users = {int(u) for u in allowed.get("users") or []}
        roles = {int(r) for r in allowed.get("roles") or []}
        content = msg.content or ""
        guild = self.guilds.get(msg.guild_id) if msg.guild_id is not None else None
        author_perms = 0
        if check_author and guild is not None and msg.webhook_id is None:
            author_perms = self.compute_permissions(guild.id, msg.author.id, msg.channel_id)
        can_ping_all = (
            not check_author or msg.webhook_id is not None or bool(author_perms & MENTION_EVERYONE)
        )
        msg.mentions = []
        for uid in map(int, _MENTION_USER.findall(content)):
            if uid in self.users and uid not in msg.mentions and ("users" in parse or uid in users):
                msg.mentions.append(uid)
        msg.mention_roles = []
        for rid in map(int, _MENTION_ROLE.findall(content)):
            role = guild.roles.get(rid) if guild else None
            if role is None or rid in msg.mention_roles or not ("roles" in parse or rid in roles):
                continue
            if role.mentionable or can_ping_all:
                msg.mention_roles.append(rid)
        msg.mention_everyone = (
            ("@everyone" in content or "@here" in content) and "everyone" in parse and can_ping_all
        )
        if msg.reference_id is not None and allowed.get("replied_user"):
            ref = self.messages.get(msg.reference_id)
            if ref is not None and ref.webhook_id is None and ref.author.id not in msg.mentions:
                msg.mentions.append(ref.author.id)

    def _message_payload(
        self,
        msg: FakeMessage,
        *,
        gateway: bool = False,
        depth: int = 0,
        session: _Session | None = None,
    ) -> dict[str, Any]:
        guild = self.guilds.get(msg.guild_id) if msg.guild_id is not None else None
        author = msg.author.to_payload()
        data: dict[str, Any] = {
            "id": str(msg.id), "channel_id": str(msg.channel_id), "author": author,
            "content": msg.content, "timestamp": _iso(msg.created_at),
            "edited_timestamp": _iso(msg.edited_at), "tts": msg.tts,
            "mention_everyone": msg.mention_everyone, "mentions": [],
            "mention_roles": [str(r) for r in msg.mention_roles],
            "attachments": [a.to_payload() for a in msg.attachments],
            "embeds": copy.deepcopy(msg.embeds), "components": copy.deepcopy(msg.components),
            "pinned": False, "type": msg.type, "flags": msg.flags, "sticker_items": [],
        }  # fmt: skip
        for uid in msg.mentions:
            entry = self.users[uid].to_payload()
            member = guild.members.get(uid) if guild else None
            if member is not None:
                entry["member"] = member.to_payload(with_user=False)
            data["mentions"].append(entry)
        if msg.nonce is not None:
            data["nonce"] = msg.nonce
        if msg.webhook_id is not None:
            data["webhook_id"] = str(msg.webhook_id)
        if msg.application_id is not None:
            data["application_id"] = str(msg.application_id)
        if msg.interaction_metadata is not None:
            data["interaction_metadata"] = copy.deepcopy(msg.interaction_metadata)
        if msg.reactions:
            data["reactions"] = [
                {"emoji": {"id": None, "name": emoji}, "count": len(users),
                 "count_details": {"burst": 0, "normal": len(users)}, "burst_colors": [],
                 "me": self.bot_user.id in users, "me_burst": False}
                for emoji, users in msg.reactions.items() if users
            ]  # fmt: skip
        if msg.reference_id is not None:
            ref = self.messages.get(msg.reference_id)
            data["message_reference"] = {
                "type": 0, "message_id": str(msg.reference_id), "channel_id": str(msg.channel_id),
                "guild_id": _opt_str(msg.guild_id),
            }  # fmt: skip
            if depth == 0:
                data["referenced_message"] = (
                    None if ref is None or ref.deleted else self._message_payload(ref, depth=1)
                )
        if gateway and guild is not None:
            data["guild_id"] = str(guild.id)
            member = guild.members.get(msg.author.id)
            if member is not None and msg.webhook_id is None:
                data["member"] = member.to_payload(with_user=False)
        if session is not None and not self._content_visible(msg, session):
            data.update(content="", embeds=[], attachments=[], components=[])
        return data

    def _content_visible(self, msg: FakeMessage, session: _Session) -> bool:
        """The MESSAGE_CONTENT privileged intent rule."""
        return (
            bool(session.intents & Intent.MESSAGE_CONTENT)
            or msg.guild_id is None
            or msg.author.id == self.bot_user.id
            or self.bot_user.id in msg.mentions
        )

    def _dispatch_message(self, event: str, msg: FakeMessage) -> int:
        if msg.ephemeral:
            return 0  # Discord never dispatches ephemeral messages
        intent = Intent.GUILD_MESSAGES if msg.guild_id is not None else Intent.DIRECT_MESSAGES
        return self._dispatch(
            event, lambda s: self._message_payload(msg, gateway=True, session=s), intent
        )

    def _post(self, msg: FakeMessage) -> None:
        """Store a new message and dispatch it (ephemeral ones are only stored)."""
        self.messages[msg.id] = msg
        if not msg.ephemeral:
            bisect.insort(self._channel_messages.setdefault(msg.channel_id, []), msg.id)
            channel = self.channels[msg.channel_id]
            channel.last_message_id = max(channel.last_message_id or 0, msg.id)
        msg.delivered = self._dispatch_message("MESSAGE_CREATE", msg)

    def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        if msg.ephemeral:
            self._notify()
            return
        data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
        intent = Intent.GUILD_MESSAGES if msg.guild_id is not None else Intent.DIRECT_MESSAGES
        self._dispatch("MESSAGE_DELETE", data, intent)

    def _react(self, msg: FakeMessage, user: FakeUser, emoji: str, *, add: bool) -> None:
        users = msg.reactions.setdefault(emoji, set())
        if (user.id in users) == add:
            return
        (users.add if add else users.discard)(user.id)
        data: dict[str, Any] = {
            "user_id": str(user.id), "channel_id": str(msg.channel_id), "message_id": str(msg.id),
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0,
        }  # fmt: skip
        if msg.guild_id is not None:
            data["guild_id"] = str(msg.guild_id)
            member = self.guilds[msg.guild_id].members.get(user.id)
            if add and member is not None:
                data["member"] = member.to_payload()
        if add:
            data["message_author_id"] = str(msg.author.id)
        intent = Intent.GUILD_MESSAGE_REACTIONS if msg.guild_id else Intent.DIRECT_MESSAGE_REACTIONS
        self._dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data, intent)

    @staticmethod
    def _validate_message_body(body: dict[str, Any]) -> None:
        """Discord's length limits, with its real error shape (code 50035)."""
        errors: dict[str, Any] = {}
        content = body.get("content")
        if content is not None and len(str(content)) > MAX_CONTENT_LENGTH:
            errors["content"] = _max_len(MAX_CONTENT_LENGTH)
        embeds = body.get("embeds") or []
        embed_errors: dict[str, Any] = {}
        if len(embeds) > 10:
            embed_errors.update(_max_len(10))
        total = 0
        for index, embed in enumerate(embeds):
            problems: dict[str, Any] = {}
            for key, limit in (("title", 256), ("description", MAX_EMBED_DESCRIPTION)):
                text = embed.get(key) or ""
                total += len(text)
                if len(text) > limit:
                    problems[key] = _max_len(limit)
            for key, sub, limit in (("footer", "text", 2048), ("author", "name", 256)):
                text = (embed.get(key) or {}).get(sub) or ""
                total += len(text)
                if len(text) > limit:
                    problems[key] = {sub: _max_len(limit)}
            for fi, fld in enumerate(embed.get("fields") or []):
                for key, limit in (("name", 256), ("value", 1024)):
                    text = str(fld.get(key) or "")
                    total += len(text)
                    if len(text) > limit:
                        problems.setdefault("fields", {}).setdefault(str(fi), {})[key] = _max_len(
                            limit
                        )
            if problems:
                embed_errors[str(index)] = problems
        if total > 6000:
            embed_errors.update(
                _field_error("MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
            )
        if embed_errors:
            errors["embeds"] = embed_errors
        if errors:
            raise _form_error(errors)

    @staticmethod
    def _require_nonempty(msg: FakeMessage) -> None:
        if not (msg.content or msg.embeds or msg.attachments or msg.components):
            raise ApiError(400, "Cannot send an empty message", 50006)

    def _apply_body(
        self, msg: FakeMessage, body: dict[str, Any], files: list[FakeFile], *, creating: bool
    ) -> None:
        """Apply a create/edit JSON body (and uploaded ``files[n]``) to ``msg``."""
        self._validate_message_body(body)
        if "content" in body:
            new = body["content"] or ""
            if not creating and new != msg.content:
                msg.history.append(msg.content)
            msg.content = str(new)
        if "embeds" in body:
            msg.embeds = copy.deepcopy(body["embeds"] or [])
        if "components" in body:
            msg.components = copy.deepcopy(body["components"] or [])
        if body.get("flags") is not None:  # ephemerality is fixed when a message is created
            keep = msg.flags & MessageFlag.EPHEMERAL
            msg.flags = keep | (int(body["flags"]) & ~(MessageFlag.LOADING | MessageFlag.EPHEMERAL))
        msg.flags &= ~MessageFlag.LOADING
        if creating:
            msg.tts = bool(body.get("tts"))
            msg.nonce = body.get("nonce")
        by_index = dict(enumerate(files))
        if "attachments" in body and body["attachments"] is not None:
            kept: list[FakeAttachment] = []
            old = {a.id: a for a in msg.attachments}
            for item in body["attachments"]:
                ident = int(item["id"])
                if ident in by_index:
                    f = by_index.pop(ident)
                    f.description = item.get("description", f.description)
                    kept.append(self._store_attachment(msg.channel_id, f))
                elif ident in old:
                    kept.append(old[ident])
            msg.attachments = kept
        msg.attachments = msg.attachments + [
            self._store_attachment(msg.channel_id, f) for f in by_index.values()
        ]
        if "allowed_mentions" in body:
            msg.allowed_mentions = copy.deepcopy(body["allowed_mentions"])
        self._compute_mentions(msg, msg.allowed_mentions, check_author=True)
        self._require_nonempty(msg)

    def _edit(
        self, msg: FakeMessage, body: dict[str, Any], files: list[FakeFile]
    ) -> dict[str, Any]:
        was_loading = msg.loading
        snapshot = copy.copy(msg)
        snapshot.history = list(msg.history)
        self._apply_body(snapshot, body, files, creating=False)
        if was_loading:
            snapshot.history = list(msg.history)  # the "thinking" placeholder is not a version
        msg.__dict__.update(snapshot.__dict__)  # only commit a body that validated
        if not was_loading:
            msg.edited_at = _now()
        self._dispatch_message("MESSAGE_UPDATE", msg)
        return self._message_payload(msg)

    # ---- REST handlers: messages ----------------------------------------------------------

    def _channel_message(self, call: _Call, channel: FakeChannel) -> FakeMessage:
        msg = self.messages.get(call.id("message_id", "Message", 10008))
        if msg is None or msg.deleted or msg.ephemeral or msg.channel_id != channel.id:
            raise _not_found("Message", 10008)
        return msg

    def _get_messages(self, call: _Call) -> list[dict[str, Any]]:
        """Discord's paging: at most ``limit`` (1-100, default 50) messages, always newest
        first.  ``before``: the newest ones older than it; ``after``: the *oldest* ones newer
        than it (discord.py's ``history(after=...)`` reverses each page and pages on from
        the first, newest, entry); ``around``: about half older (it included), half newer.
        Without Read Message History Discord answers an empty list, not an error."""
        channel = self._channel(call)
        if not self.bot_permissions(channel.id) & permission_value("read_message_history"):
            return []
        limit = max(1, min(100, int(call.query.get("limit", 50))))
        msgs = self.channel_messages(channel.id)
        if "around" in call.query:
            around = int(call.query["around"])
            older = [m for m in msgs if m.id <= around][-((limit + 1) // 2) :]
            newer = [m for m in msgs if m.id > around][: limit - len(older)]
            picked = older + newer
        elif "after" in call.query:
            picked = [m for m in msgs if m.id > int(call.query["after"])][:limit]
        else:
            before = int(call.query.get("before", 1 << 63))
            picked = [m for m in msgs if m.id < before][-limit:]
        return [self._message_payload(m) for m in reversed(picked)]  # newest first, like Discord

    def _get_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        self._require(channel, "read_message_history")
        return self._message_payload(self._channel_message(call, channel))

    def _create_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        if channel.type == ChannelType.DM:
            if not channel.recipients[0].accepts_dms:
                raise ApiError(403, "Cannot send messages to this user", 50007)
        else:
            self._require(
                channel, "send_messages_in_threads" if channel.is_thread else "send_messages"
            )
            if call.files:
                self._require(channel, "attach_files")
        body = call.body
        ref_id: int | None = None
        reference = body.get("message_reference")
        if reference:
            ref_id = int(reference["message_id"])
            ref = self.messages.get(ref_id)
            if ref is None or ref.deleted or ref.ephemeral:
                if reference.get("fail_if_not_exists", True):
                    raise _form_error({"message_reference": _field_error(
                        "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")})  # fmt: skip
                ref_id = None
        msg = FakeMessage(
            id=self.snowflake(), channel_id=channel.id, guild_id=channel.guild_id,
            author=self.bot_user, type=19 if ref_id else 0, reference_id=ref_id,
        )  # fmt: skip
        self._apply_body(msg, body, call.files, creating=True)
        self._post(msg)
        return self._message_payload(msg)

    def _edit_message(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if msg.author.id != self.bot_user.id or msg.webhook_id is not None:
            if set(call.body) - {"flags"}:
                raise ApiError(403, "Cannot edit a message authored by another user", 50005)
            self._require(channel, "manage_messages")
        return self._edit(msg, call.body, call.files)

    def _delete_message(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if msg.author.id != self.bot_user.id:
            self._require(channel, "manage_messages")
        self._delete(msg)

    def _bulk_delete(self, call: _Call) -> None:
        channel = self._channel(call)
        self._require(channel, "manage_messages")
        ids = [int(i) for i in call.body.get("messages", [])]
        if not 2 <= len(ids) <= 100:
            raise _form_error({"messages": _bad_len(2, 100)})
        for mid in ids:
            msg = self.messages.get(mid)
            if msg is not None and msg.channel_id == channel.id and not msg.deleted:
                msg.deleted = True
        data: dict[str, Any] = {"ids": [str(i) for i in ids], "channel_id": str(channel.id)}
        if channel.guild_id is not None:
            data["guild_id"] = str(channel.guild_id)
        self._dispatch("MESSAGE_DELETE_BULK", data, Intent.GUILD_MESSAGES)

    def _put_reaction(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        if channel.guild_id is not None:
            self._require(channel, "add_reactions", "read_message_history")
        self._react(msg, self.bot_user, call.params["emoji"], add=True)

    def _delete_reaction(self, call: _Call) -> None:
        channel = self._channel(call)
        msg = self._channel_message(call, channel)
        self._react(msg, self.bot_user, call.params["emoji"], add=False)

    def _create_thread(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        assert channel.guild_id is not None
        private = call.body.get("type") == ChannelType.PRIVATE_THREAD
        self._require(channel, "create_private_threads" if private else "create_public_threads")
        name = str(call.body.get("name") or "")
        if not 1 <= len(name) <= 100:
            raise _form_error({"name": _bad_len(1, 100)})
        started_from: int | None = None
        if "message_id" in call.params:
            # a thread started from a message has the message's id, one thread per message
            started_from = self._channel_message(call, channel).id
            if started_from in self.channels:
                raise ApiError(400, "A thread has already been created for this message", 160004)
        thread = self.add_thread(
            channel.id, name, private=private, owner=self.bot_user, id=started_from
        )
        return thread.to_payload()
