"""Application commands and interactions: registering commands over REST, invoking slash
commands, autocomplete, context menus, buttons, selects and modals as a user would, and
the interaction callback / follow-up handlers.
"""

from __future__ import annotations

import asyncio
import copy
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tests.fake_discord.common import (
    PATIENCE,
    ApiError,
    MessageFlag,
    _bad_len,
    _bool_query,
    _field_error,
    _form_error,
    _max_len,
    _not_found,
    _opt_str,
)
from tests.fake_discord.models import (
    FakeChannel,
    FakeFile,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    InteractionHandle,
    InteractionResponse,
    UserLike,
    _Call,
)

_OPTION_TYPES = {1: "SUB_COMMAND", 2: "SUB_COMMAND_GROUP", 3: "STRING", 4: "INTEGER", 5: "BOOLEAN",
                 6: "USER", 7: "CHANNEL", 8: "ROLE", 9: "MENTIONABLE", 10: "NUMBER", 11: "ATTACHMENT"}  # fmt: skip
_ALLOWED_CALLBACKS = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}


class CommandsMixin:
    """Application commands and interactions; mixed into :class:`FakeDiscord`."""

    # ---- interactions ---------------------------------------------------------------------

    async def invoke_command(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        respond_within: float = 3.0,
        locale: str = "en-US",
    ) -> InteractionHandle:
        """Run a *registered* slash command, e.g. ``("persona use", {"name": "Aria"})``.

        Subcommand groups/subcommands become nested type 2/1 options; values are converted
        by the registered option types (users/members/channels/roles/attachments go into
        ``resolved``; an attachment option takes a :class:`FakeFile`).  The bot must make its
        initial callback within ``respond_within`` seconds, or gets 404 Unknown interaction."""
        data = self._command_data(channel_id, name, dict(options or {}), focused=None)
        return await self._interact(
            2, channel_id, user, data, respond_within, locale=locale, command_name=name
        )

    async def autocomplete(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        timeout: float = PATIENCE,
    ) -> list[dict[str, Any]]:
        """Send an autocomplete interaction for option ``focused``; return the bot's choices."""
        data = self._command_data(channel_id, name, dict(options), focused=focused)
        handle = await self._interact(4, channel_id, user, data, timeout, command_name=name)
        response = await handle.wait_response(timeout)
        return response.choices

    async def invoke_context_menu(
        self,
        channel_id: int,
        user: UserLike,
        name: str,
        target: FakeMessage | UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Run a registered user (type 2) or message (type 3) context-menu command."""
        guild_id = self.channels[channel_id].guild_id
        kind = 3 if isinstance(target, FakeMessage) else 2
        cmd = self._find_command(name, guild_id, kind)
        resolved: dict[str, Any] = {}
        if isinstance(target, FakeMessage):
            target_id = target.id
            resolved["messages"] = {str(target.id): self._message_payload(target)}
        else:
            target_id = self._user_id(target)
            self._resolve_user(target_id, guild_id, channel_id, resolved)
        data = {"id": str(cmd["id"]), "name": cmd["name"], "type": kind,
                "target_id": str(target_id), "resolved": resolved}  # fmt: skip
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._interact(2, channel_id, user, data, respond_within, command_name=name)

    async def click_button(
        self,
        message: FakeMessage | int,
        custom_id: str,
        user: UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Click a button the bot put on a message (ephemeral messages too)."""
        msg = self._resolve_message(message)
        component = self._find_component(msg, custom_id)
        if component.get("disabled"):
            raise ValueError(f"button {custom_id!r} is disabled")
        data = {"custom_id": custom_id, "component_type": component["type"]}
        return await self._interact(
            3, msg.channel_id, user, data, respond_within, component_message=msg
        )

    async def select_option(
        self,
        message: FakeMessage | int,
        custom_id: str,
        values: Sequence[str],
        user: UserLike,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Pick values in a select menu the bot put on a message."""
        msg = self._resolve_message(message)
        component = self._find_component(msg, custom_id)
        offered = [o["value"] for o in component.get("options") or []]
        if component["type"] == 3 and any(v not in offered for v in values):
            raise ValueError(f"{list(values)} not all among the options {offered}")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"],
                                "values": [str(v) for v in values]}  # fmt: skip
        if component["type"] in (5, 6, 7, 8):
            resolved: dict[str, Any] = {}
            for value in values:
                self._resolve_mentionable(int(value), msg.guild_id, msg.channel_id, resolved)
            data["resolved"] = resolved
        return await self._interact(
            3, msg.channel_id, user, data, respond_within, component_message=msg
        )

    async def submit_modal(
        self,
        handle: InteractionHandle,
        values: Mapping[str, str | Sequence[str]],
        user: UserLike | None = None,
        *,
        respond_within: float = 3.0,
    ) -> InteractionHandle:
        """Submit the modal the bot answered ``handle`` with (callback type 9).  ``values``
        maps each input's custom_id to its text (or a list of values for selects)."""
        if handle.response is None or handle.response.type != 9:
            raise ValueError("that interaction was not answered with a modal")
        modal = handle.response.data

        def build(comp: dict[str, Any]) -> dict[str, Any]:
            kind = comp.get("type")
            out: dict[str, Any] = {"type": kind, "id": comp.get("id")}
            if kind == 1:
                out["components"] = [build(c) for c in comp.get("components", [])]
            elif kind == 18:
                out["component"] = build(comp["component"])
            elif kind == 4:
                out.update(custom_id=comp["custom_id"],
                           value=str(values.get(comp["custom_id"], comp.get("value") or "")))  # fmt: skip
            elif "custom_id" in comp:
                picked = values.get(comp["custom_id"], [])
                out.update(
                    custom_id=comp["custom_id"],
                    values=[picked] if isinstance(picked, str) else list(picked),
                )
            return out

        data = {
            "custom_id": modal["custom_id"],
            "components": [build(c) for c in modal.get("components", [])],
        }
        return await self._interact(
            5, handle.channel_id, user if user is not None else handle.user, data, respond_within,
            component_message=handle.component_message,
        )  # fmt: skip

    async def _interact(
        self,
        kind: int,
        channel_id: int,
        user: UserLike,
        data: dict[str, Any],
        respond_within: float,
        *,
        locale: str = "en-US",
        command_name: str | None = None,
        component_message: FakeMessage | None = None,
    ) -> InteractionHandle:
        channel = self.channels[channel_id]
        fake_user = self.users[self._user_id(user)]
        iid, token = self.snowflake(), secrets.token_urlsafe(24)
        payload: dict[str, Any] = {
            "id": str(iid), "application_id": str(self.application_id), "type": kind, "data": data,
            "channel": channel.to_payload(), "channel_id": str(channel_id), "token": token,
            "version": 1, "locale": locale, "entitlements": [], "attachment_size_limit": 10 * 2**20,
            "app_permissions": str(self.bot_permissions(channel_id)),
        }  # fmt: skip
        if channel.guild_id is not None:
            guild = self.guilds[channel.guild_id]
            member = guild.members.get(fake_user.id)
            if member is None:
                raise ValueError(f"{fake_user.username} is not a member of guild {guild.id}")
            perms = self.compute_permissions(guild.id, fake_user.id, channel_id)
            payload.update(
                guild_id=str(guild.id), guild_locale="en-US", context=0,
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                member=member.to_payload() | {"permissions": str(perms)},
                authorizing_integration_owners={"0": str(guild.id)},
            )  # fmt: skip
        else:
            payload.update(user=fake_user.to_payload(), context=1,
                           authorizing_integration_owners={"0": str(fake_user.id)})  # fmt: skip
        if component_message is not None:
            payload["message"] = self._message_payload(component_message)
        handle = InteractionHandle(
            self, id=iid, token=token, type=kind, payload=payload, channel_id=channel_id,
            guild_id=channel.guild_id, user=fake_user,
            deadline=asyncio.get_running_loop().time() + respond_within,
            command_name=command_name, component_message=component_message,
        )  # fmt: skip
        self._interactions[iid] = handle
        self._dispatch("INTERACTION_CREATE", payload)
        await self._flush()
        return handle

    def _find_command(self, name: str, guild_id: int | None, kind: int = 1) -> dict[str, Any]:
        scopes = ([guild_id] if guild_id is not None else []) + [None]
        for scope in scopes:
            for cmd in self._commands.get(scope, []):
                if cmd["name"] == name and cmd.get("type", 1) == kind:
                    return cmd
        known = sorted(c["name"] for s in scopes for c in self._commands.get(s, []))
        raise LookupError(f"no registered command {name!r} (type {kind}); registered: {known}")

    def _command_data(
        self, channel_id: int, name: str, options: dict[str, Any], *, focused: str | None
    ) -> dict[str, Any]:
        guild_id = self.channels[channel_id].guild_id
        parts = name.split()
        cmd = self._find_command(parts[0], guild_id)
        data: dict[str, Any] = {"id": str(cmd["id"]), "name": cmd["name"], "type": 1}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        defs: list[dict[str, Any]] = cmd.get("options") or []
        container: list[dict[str, Any]] = []
        data["options"] = container
        for part in parts[1:]:
            sub = next((o for o in defs if o["name"] == part and o["type"] in (1, 2)), None)
            if sub is None:
                raise LookupError(f"{name!r}: no subcommand {part!r}")
            node: dict[str, Any] = {"name": part, "type": sub["type"], "options": []}
            container.append(node)
            container, defs = node["options"], sub.get("options") or []
        if any(o["type"] in (1, 2) for o in defs):
            raise ValueError(f"{name!r} needs a subcommand: {[o['name'] for o in defs]}")
        resolved: dict[str, Any] = {}
        by_name = {o["name"]: o for o in defs}
        for key, value in options.items():
            if key not in by_name:
                raise LookupError(f"{name!r} has no option {key!r}; it has {sorted(by_name)}")
            opt = by_name[key]
            entry: dict[str, Any] = {"name": key, "type": opt["type"]}
            if key == focused:
                entry.update(value=str(value), focused=True)
            else:
                entry["value"] = self._option_value(opt, value, guild_id, channel_id, resolved)
            container.append(entry)
        if focused is None:
            missing = [o["name"] for o in defs if o.get("required") and o["name"] not in options]
            if missing:
                raise ValueError(f"{name!r}: missing required option(s) {missing}")
        if resolved:
            data["resolved"] = resolved
        return data

    def _option_value(
        self,
        opt: dict[str, Any],
        value: Any,
        guild_id: int | None,
        channel_id: int,
        resolved: dict[str, Any],
    ) -> Any:
        kind = opt["type"]
        if kind == 3:
            result: Any = str(value)
        elif kind == 4:
            if isinstance(value, bool) or int(value) != value:
                raise TypeError(f"option {opt['name']!r} wants an integer, got {value!r}")
            result = int(value)
        elif kind == 5:
            result = bool(value)
        elif kind == 10:
            result = float(value)
        elif kind == 6:
            uid = self._user_id(value)
            self._resolve_user(uid, guild_id, channel_id, resolved)
            result = str(uid)
        elif kind == 7:
            cid = value.id if isinstance(value, FakeChannel) else int(value)
            self._resolve_channel(cid, resolved)
            result = str(cid)
        elif kind == 8:
            rid = value.id if isinstance(value, FakeRole) else int(value)
            self._resolve_role(rid, guild_id, resolved)
            result = str(rid)
        elif kind == 9:
            mid = value.id if isinstance(value, FakeRole | FakeUser | FakeMember) else int(value)
            self._resolve_mentionable(mid, guild_id, channel_id, resolved)
            result = str(mid)
        elif kind == 11:
            if not isinstance(value, FakeFile):
                raise TypeError(f"option {opt['name']!r} wants a FakeFile")
            att = self._store_attachment(channel_id, value, ephemeral=True)
            resolved.setdefault("attachments", {})[str(att.id)] = att.to_payload()
            result = str(att.id)
        else:
            raise ValueError(f"unsupported option type {kind}")
        choices = opt.get("choices")
        if choices and result not in [c["value"] for c in choices]:
            raise ValueError(f"{result!r} is not a choice of {opt['name']!r}: {choices}")
        return result

    def _resolve_user(
        self, uid: int, guild_id: int | None, channel_id: int, resolved: dict[str, Any]
    ) -> None:
        resolved.setdefault("users", {})[str(uid)] = self.users[uid].to_payload()
        member = self.guilds[guild_id].members.get(uid) if guild_id is not None else None
        if member is not None:
            perms = self.compute_permissions(guild_id, uid, channel_id)  # type: ignore[arg-type]
            resolved.setdefault("members", {})[str(uid)] = member.to_payload(with_user=False) | {
                "permissions": str(perms)
            }

    def _resolve_role(self, rid: int, guild_id: int | None, resolved: dict[str, Any]) -> None:
        if guild_id is None or rid not in self.guilds[guild_id].roles:
            raise LookupError(f"unknown role {rid}")
        resolved.setdefault("roles", {})[str(rid)] = self.guilds[guild_id].roles[rid].to_payload()

    def _resolve_channel(self, cid: int, resolved: dict[str, Any]) -> None:
        channel = self.channels[cid]
        entry: dict[str, Any] = {
            "id": str(cid), "name": channel.name, "type": channel.type,
            "permissions": str(self.bot_permissions(cid)), "parent_id": _opt_str(channel.parent_id),
        }  # fmt: skip
        if channel.is_thread:
            entry["thread_metadata"] = channel.to_payload()["thread_metadata"]
        resolved.setdefault("channels", {})[str(cid)] = entry

    def _resolve_mentionable(
        self, mid: int, guild_id: int | None, channel_id: int, resolved: dict[str, Any]
    ) -> None:
        if guild_id is not None and mid in self.guilds[guild_id].roles:
            self._resolve_role(mid, guild_id, resolved)
        elif mid in self.channels:
            self._resolve_channel(mid, resolved)
        else:
            self._resolve_user(mid, guild_id, channel_id, resolved)

    @staticmethod
    def _find_component(msg: FakeMessage, custom_id: str) -> dict[str, Any]:
        def walk(items: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
            for item in items:
                yield item
                yield from walk(item.get("components") or [])
                for key in ("component", "accessory"):
                    if isinstance(item.get(key), dict):
                        yield from walk([item[key]])

        for comp in walk(msg.components):
            if comp.get("custom_id") == custom_id:
                return comp
        raise LookupError(f"message {msg.id} has no component {custom_id!r}")

    # ---- REST handlers: application commands ----------------------------------------------

    def _command_scope(self, call: _Call) -> int | None:
        if call.params.get("app_id") != str(self.application_id):
            raise ApiError(403, "Missing Access", 50001)
        if "guild_id" in call.params:
            return self._guild(call).id
        return None

    def _normalise_command(
        self, definition: dict[str, Any], scope: int | None, existing: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Validate like Discord does and fill in the fields it adds (id, version...)."""
        kind = definition.get("type", 1)
        name = str(definition.get("name", ""))
        errors: dict[str, Any] = {}
        if kind == 1:
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
                errors["name"] = _field_error(
                    "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if not 1 <= len(definition.get("description") or "") <= 100:
                errors["description"] = _bad_len(1, 100)
        elif not 1 <= len(name) <= 32:
            errors["name"] = _bad_len(1, 32)
        problems = self._check_options(definition.get("options") or [])
        if problems:
            errors["options"] = problems
        if errors:
            raise _form_error(errors)
        previous = next(
            (c for c in existing if c["name"] == name and c.get("type", 1) == kind), None
        )
        cmd = {
            "type": kind, "description": "", "options": [], "default_member_permissions": None,
            "dm_permission": True, "nsfw": False, "integration_types": [0], "contexts": None,
            "name_localizations": None, "description_localizations": None,
        } | copy.deepcopy(definition)  # fmt: skip
        cmd.update(
            id=previous["id"] if previous else str(self.snowflake()),
            application_id=str(self.application_id),
            version=str(self.snowflake()),
        )
        if scope is not None:
            cmd["guild_id"] = str(scope)
        return cmd

    def _check_options(self, options: list[dict[str, Any]]) -> dict[str, Any]:
        errors: dict[str, Any] = {}
        if len(options) > 25:
            errors.update(_max_len(25))
        seen_optional = False
        for index, opt in enumerate(options):
            problems: dict[str, Any] = {}
            if opt.get("type") not in _OPTION_TYPES:
                problems["type"] = _field_error(
                    "BASE_TYPE_CHOICES", "Value must be one of option types."
                )
            name = str(opt.get("name", ""))
            if not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower():
                problems["name"] = _field_error(
                    "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            if not 1 <= len(opt.get("description") or "") <= 100:
                problems["description"] = _bad_len(1, 100)
            if opt.get("required") and seen_optional:
                problems["required"] = _field_error(
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", "Required options must be placed before non-required options"
                )  # fmt: skip
            seen_optional = seen_optional or (
                opt.get("type") not in (1, 2) and not opt.get("required")
            )
            if len(opt.get("choices") or []) > 25:
                problems["choices"] = _max_len(25)
            nested = self._check_options(opt.get("options") or [])
            if nested:
                problems["options"] = nested
            if problems:
                errors[str(index)] = problems
        return errors

    def _get_commands(self, call: _Call) -> list[dict[str, Any]]:
        return copy.deepcopy(self._commands.get(self._command_scope(call), []))

    def _put_commands(self, call: _Call) -> list[dict[str, Any]]:
        scope = self._command_scope(call)
        existing = self._commands.get(scope, [])
        definitions = call.json if isinstance(call.json, list) else []
        if len(definitions) > 100:
            raise _form_error(_max_len(100))
        commands = []
        for index, definition in enumerate(definitions):
            try:
                commands.append(self._normalise_command(definition, scope, existing))
            except ApiError as exc:
                raise _form_error({str(index): exc.body["errors"]}) from None
        self._commands[scope] = commands
        return copy.deepcopy(commands)

    def _post_command(self, call: _Call) -> dict[str, Any]:
        scope = self._command_scope(call)
        existing = self._commands.setdefault(scope, [])
        cmd = self._normalise_command(call.body, scope, existing)
        existing[:] = [c for c in existing if c["id"] != cmd["id"]] + [cmd]
        return copy.deepcopy(cmd)

    def _command_by_id(self, call: _Call) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        commands = self._commands.get(self._command_scope(call), [])
        for cmd in commands:
            if cmd["id"] == call.params["command_id"]:
                return commands, cmd
        raise _not_found("application command", 10063)

    def _get_command(self, call: _Call) -> dict[str, Any]:
        return copy.deepcopy(self._command_by_id(call)[1])

    def _patch_command(self, call: _Call) -> dict[str, Any]:
        commands, cmd = self._command_by_id(call)
        merged = {
            k: v for k, v in cmd.items() if k not in ("id", "version", "application_id", "guild_id")
        }
        updated = self._normalise_command(merged | call.body, self._command_scope(call), [cmd])
        updated["id"] = cmd["id"]
        commands[commands.index(cmd)] = updated
        return copy.deepcopy(updated)

    def _delete_command(self, call: _Call) -> None:
        commands, cmd = self._command_by_id(call)
        commands.remove(cmd)

    # ---- REST handlers: interactions ------------------------------------------------------

    def _interaction_message(
        self,
        handle: InteractionHandle,
        body: dict[str, Any],
        files: list[FakeFile],
        *,
        loading: bool = False,
    ) -> FakeMessage:
        flags = int(body.get("flags") or 0) & MessageFlag.EPHEMERAL
        meta = {
            "id": str(handle.id), "type": handle.type, "user": handle.user.to_payload(),
            "authorizing_integration_owners": handle.payload.get("authorizing_integration_owners", {}),
        }  # fmt: skip
        if handle.command_name:
            meta["name"] = handle.command_name
        is_original = handle.response is None
        msg = FakeMessage(
            id=self.snowflake(), channel_id=handle.channel_id, guild_id=handle.guild_id,
            author=self.bot_user, webhook_id=self.application_id, application_id=self.application_id,
            type=20 if is_original and handle.type == 2 else 0, flags=flags, interaction_metadata=meta,
        )  # fmt: skip
        if loading:
            msg.flags |= MessageFlag.LOADING
        else:
            self._apply_body(msg, body, files, creating=True)
        return msg

    def _interaction_callback(self, call: _Call) -> dict[str, Any] | None:
        handle = self._interactions.get(call.id("interaction_id", "interaction", 10062))
        if handle is None or handle.token != call.params["token"]:
            raise _not_found("interaction", 10062)
        if handle.response is not None:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        if asyncio.get_running_loop().time() > handle.deadline:
            handle.expired = True
            raise _not_found("interaction", 10062)
        body = call.body
        kind = body.get("type")
        data = body.get("data") or {}
        if kind not in _ALLOWED_CALLBACKS.get(handle.type, set()):
            raise _form_error({"type": _field_error("INTERACTION_RESPONSE_TYPE_INVALID",
                                                    f"Invalid response type {kind} for interaction type {handle.type}")})  # fmt: skip
        message: FakeMessage | None = None
        if kind == 4:
            message = self._interaction_message(handle, data, call.files)
        elif kind == 5:
            message = self._interaction_message(handle, data, [], loading=True)
        elif kind == 6:
            handle.original = handle.component_message
        elif kind == 7:
            if handle.component_message is None:
                raise ApiError(400, "Unknown message", 10008)
            self._edit(handle.component_message, data, call.files)
            handle.original = message = handle.component_message
        elif kind == 8:
            if len(data.get("choices") or []) > 25:
                raise _form_error({"data": {"choices": _max_len(25)}})
        elif kind == 9:
            errors = {k: _field_error("BASE_TYPE_REQUIRED", "This field is required")
                      for k in ("custom_id", "title", "components") if not data.get(k)}  # fmt: skip
            if errors:
                raise _form_error({"data": errors})
        handle.response = InteractionResponse(
            type=kind, data=copy.deepcopy(data), files=list(call.files)
        )
        if kind in (4, 5):
            assert message is not None
            handle.original = message
            self._post(message)
        self._notify()
        if not _bool_query(call.query.get("with_response")):
            return None
        result: dict[str, Any] = {"interaction": {"id": str(handle.id), "type": handle.type}}
        result["resource"] = {"type": kind}
        if message is not None:
            result["interaction"].update(
                response_message_id=str(message.id), response_message_loading=kind == 5,
                response_message_ephemeral=message.ephemeral,
            )  # fmt: skip
            result["resource"]["message"] = self._message_payload(message)
        return result
