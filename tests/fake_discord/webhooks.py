"""Webhooks: create/list/edit/delete over REST, executing a webhook (custom name and
avatar), and editing or deleting the messages it posted.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from tests.fake_discord.common import (
    MANAGE_WEBHOOKS,
    MISSING_PERMISSIONS,
    ApiError,
    Intent,
    _bad_len,
    _bool_query,
    _field_error,
    _form_error,
    _not_found,
    _opt_str,
)
from tests.fake_discord.models import (
    FakeChannel,
    FakeMessage,
    FakeUser,
    FakeWebhook,
    InteractionHandle,
    _Call,
)


class WebhooksMixin:
    """Webhook routes; mixed into :class:`FakeDiscord`."""

    # ---- REST handlers: webhooks ----------------------------------------------------------

    def _create_webhook(
        self,
        channel: FakeChannel,
        name: str,
        creator: FakeUser,
        application_id: int | None,
        avatar: str | None = None,
    ) -> FakeWebhook:
        hook = FakeWebhook(
            id=self.snowflake(), token=secrets.token_urlsafe(48), channel_id=channel.id,
            guild_id=channel.guild_id, name=name, creator=creator, avatar=avatar,
            application_id=application_id,
        )  # fmt: skip
        self.webhooks[hook.id] = hook
        self._dispatch(
            "WEBHOOKS_UPDATE",
            {"guild_id": _opt_str(channel.guild_id), "channel_id": str(channel.id)},
            Intent.GUILD_WEBHOOKS,
        )
        return hook

    @staticmethod
    def _check_webhook_name(name: str, key: str = "name") -> None:
        lowered = name.lower()
        if not 1 <= len(name) <= 80:
            raise _form_error({key: _bad_len(1, 80)})
        if "discord" in lowered or "clyde" in lowered:
            raise _form_error(
                {
                    key: _field_error(
                        "USERNAME_INVALID_CONTAINS", 'Username cannot contain "discord"'
                    )
                }
            )

    def _create_channel_webhook(self, call: _Call) -> dict[str, Any]:
        channel = self._channel(call)
        if channel.guild_id is None or channel.is_thread:
            raise ApiError(400, "Cannot execute action on this channel type", 50024)
        self._require(channel, "manage_webhooks")
        name = str(call.body.get("name") or "")
        self._check_webhook_name(name)
        if sum(1 for h in self.webhooks.values() if h.channel_id == channel.id) >= 15:
            raise ApiError(400, "Maximum number of webhooks reached (15)", 30007)
        avatar = call.body.get("avatar")
        hook = self._create_webhook(
            channel, name, self.bot_user, self.application_id,
            hashlib.md5(avatar.encode()).hexdigest() if avatar else None,
        )  # fmt: skip
        return hook.to_payload()

    def _get_channel_webhooks(self, call: _Call) -> list[dict[str, Any]]:
        channel = self._channel(call)
        self._require(channel, "manage_webhooks")
        return [h.to_payload() for h in self.webhooks.values() if h.channel_id == channel.id]

    def _get_guild_webhooks(self, call: _Call) -> list[dict[str, Any]]:
        guild = self._guild(call)
        if not self.compute_permissions(guild.id, self.bot_user.id) & MANAGE_WEBHOOKS:
            raise ApiError(*MISSING_PERMISSIONS)
        return [h.to_payload() for h in self.webhooks.values() if h.guild_id == guild.id]

    def _webhook(self, call: _Call) -> FakeWebhook:
        """The webhook of the path, authorised either by its token or by the bot's token."""
        hook = self.webhooks.get(call.id("webhook_id", "Webhook", 10015))
        if hook is None or ("token" in call.params and call.params["token"] != hook.token):
            raise _not_found("Webhook", 10015)
        if "token" not in call.params and hook.channel_id in self.channels:
            self._require(self.channels[hook.channel_id], "manage_webhooks")
        return hook

    def _get_webhook(self, call: _Call) -> dict[str, Any]:
        hook = self._webhook(call)
        payload = hook.to_payload()
        if "token" in call.params:
            payload.pop("user", None)  # Discord omits the creator when fetched by token
        return payload

    def _patch_webhook(self, call: _Call) -> dict[str, Any]:
        hook = self._webhook(call)
        if "name" in call.body:
            self._check_webhook_name(str(call.body["name"] or ""))
            hook.name = call.body["name"]
        if "avatar" in call.body:
            avatar = call.body["avatar"]
            hook.avatar = hashlib.md5(avatar.encode()).hexdigest() if avatar else None
        if "channel_id" in call.body and "token" not in call.params:
            hook.channel_id = int(call.body["channel_id"])
        return hook.to_payload()

    def _delete_webhook_route(self, call: _Call) -> None:
        self.delete_webhook(self._webhook(call).id)

    def _interaction_for_token(self, call: _Call) -> InteractionHandle | None:
        if call.params.get("webhook_id") != str(self.application_id):
            return None
        return next(
            (h for h in self._interactions.values() if h.token == call.params["token"]), None
        )

    def _execute_webhook(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interaction_for_token(call)
        if handle is not None:  # an interaction follow-up
            if handle.response is None:
                raise _not_found("Webhook", 10015)
            if handle.original is not None and handle.original.loading:
                # Discord: the first follow-up after a "thinking" defer *replaces* the
                # placeholder (and keeps its ephemerality, whatever flags the follow-up has)
                return self._edit(handle.original, call.body, call.files)
            msg = self._interaction_message(handle, call.body, call.files)
            handle.followups.append(msg)
            self._post(msg)
            return self._message_payload(msg)
        hook = self._webhook(call)
        channel = self.channels[hook.channel_id]
        if "thread_id" in call.query:
            thread = self.channels.get(int(call.query["thread_id"]))
            if thread is None or thread.parent_id != hook.channel_id:
                raise _not_found("Channel", 10003)
            channel = thread
        body = call.body
        username = body.get("username") or None
        if username is not None:
            self._check_webhook_name(str(username), "username")
        author = FakeUser(id=hook.id, username=username or hook.name, bot=True, avatar=hook.avatar)
        msg = FakeMessage(
            id=self.snowflake(), channel_id=channel.id, guild_id=channel.guild_id, author=author,
            webhook_id=hook.id, application_id=hook.application_id,
            username=username or hook.name, avatar_url=body.get("avatar_url"),
        )  # fmt: skip
        self._apply_body(msg, body, call.files, creating=True)
        self._post(msg)
        if not _bool_query(call.query.get("wait")):
            return None
        return self._message_payload(msg)

    def _webhook_message(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interaction_for_token(call)
        mid = call.params["message_id"]
        msg: FakeMessage | None
        if handle is not None:
            if mid == "@original":
                msg = handle.original
            else:
                msg = next((m for m in handle.messages if str(m.id) == mid), None)
        else:
            hook = self._webhook(call)
            msg = self.messages.get(int(mid)) if mid.isdigit() else None
            if msg is not None and msg.webhook_id != hook.id:
                msg = None
        if msg is None or msg.deleted:
            raise _not_found("Message", 10008)
        method = call.request.method
        if method == "GET":
            return self._message_payload(msg)
        if method == "DELETE":
            self._delete(msg)
            return None
        return self._edit(msg, call.body, call.files)
