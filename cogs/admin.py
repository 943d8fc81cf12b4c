"""`/admin`: run the bot from Discord alone. Visible to Manage Server by default, checked again on
every use (`bot.discord.checks.is_manager`: Manage Server, or a user in OWNER_IDS), answered ephemerally,
and audited. Setting names and ranges come from `bot.settings`; what a channel's settings are,
and where each comes from, from the channel policy (`bot.policy`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.discord.answering import say_privately
from bot.discord.checks import audit, is_owner, policy_for, require_manager
from bot.engine import first_line
from bot.metrics import summary
from bot.policy import MODES
from bot.recall import recall, recall_tokens
from bot.settings import TUNABLE, check_tunable, tunable_label
from bot.summaries import SUMMARY_MAX_CHARS, describe, replace_summary

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)

Channelish = discord.TextChannel | discord.Thread | discord.VoiceChannel
#: `/admin settings set` offers the tunable settings, each named with its range.
SETTING_CHOICES = [
    app_commands.Choice(name=f"{name} ({tunable_label(name)})", value=name) for name in TUNABLE
]


class ConfirmClear(discord.ui.View):
    """A confirm button only the invoker can press; it times out into a no-op."""

    def __init__(self, invoker_id: int, timeout: float = 60.0) -> None:
        super().__init__(timeout=timeout)
        self.invoker_id = invoker_id
        self.confirmed: bool | None = None

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id != self.invoker_id:
            await interaction.response.send_message(
                "Only the admin who asked can confirm this.", ephemeral=True
            )
            return False
        return True

    @discord.ui.button(label="Delete the stored turns", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.confirmed = True
        await interaction.response.edit_message(content="Clearing…", view=None)
        self.stop()

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, _: discord.ui.Button) -> None:
        self.confirmed = False
        await interaction.response.edit_message(
            content="Cancelled; nothing was deleted.", view=None
        )
        self.stop()


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class Admin(commands.GroupCog, group_name="admin", group_description="Run the bot in this server"):
    settings_group = app_commands.Group(name="settings", description="Generation settings")
    memory_group = app_commands.Group(name="memory", description="This channel's memory")
    persona_group = app_commands.Group(name="persona", description="Server persona rules")
    access_group = app_commands.Group(name="access", description="Who and where the bot serves")
    model_group = app_commands.Group(name="model", description="The model")

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self.memory = bot.memory
        self._reloading = asyncio.Lock()
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        """Every /admin command: the shared manager check (refusals are answered by the bot)."""
        return await require_manager(interaction)

    # ---- channel mode -----------------------------------------------------------------------

    @app_commands.command(
        name="channel",
        description="When the bot answers in a channel (off, mention, always, threads)",
    )
    @app_commands.describe(
        mode="off: never; mention: when mentioned or replied to; always: every message; "
        "threads: a thread per conversation",
        channel="defaults to this channel",
    )
    @app_commands.choices(mode=[app_commands.Choice(name=m, value=m) for m in MODES])
    async def channel(
        self,
        interaction: discord.Interaction,
        mode: str,
        channel: Channelish | None = None,
    ) -> None:
        target = channel.id if channel else interaction.channel_id
        assert target is not None
        old = (await self.memory.places.channel(target)).mode
        await self.memory.places.update_channel(target, interaction.guild_id, mode=mode)
        await audit(interaction, "channel.mode", old, mode, target)
        await say_privately(
            interaction,
            f"<#{target}> is now `{mode}` (was `{old or 'mention (default)'}`)."
            + (" Threads inside it follow it unless set on their own." if mode else ""),
        )

    # ---- generation settings ----------------------------------------------------------------

    @settings_group.command(name="show", description="Effective settings and where each comes from")
    async def settings_show(
        self, interaction: discord.Interaction, channel: Channelish | None = None
    ) -> None:
        where = channel or interaction.channel
        assert where is not None and interaction.guild_id is not None
        target = where.id
        eff = (await policy_for(self.bot, where, interaction.guild_id)).settings
        lines = [f"`{k}` = **{eff.values[k]}** ({eff.source[k]})" for k in TUNABLE]
        await say_privately(interaction, f"Settings for <#{target}>:\n" + "\n".join(lines))

    @settings_group.command(
        name="set", description="Change a setting: generation, allow_bots, idle replies, wake words"
    )
    @app_commands.choices(name=SETTING_CHOICES)
    async def settings_set(
        self,
        interaction: discord.Interaction,
        name: str,
        value: str,
        scope: Literal["server", "channel"] = "channel",
    ) -> None:
        try:
            parsed = check_tunable(name, value)
        except ValueError as exc:
            await say_privately(interaction, f"Not changed: {exc}.")
            return
        assert interaction.guild_id is not None and interaction.channel_id is not None
        if scope == "server":
            guild = await self.memory.places.guild(interaction.guild_id)
            old = guild.settings.get(name)
            await self.memory.places.update_guild(
                interaction.guild_id, settings={**guild.settings, name: parsed}
            )
        else:
            chan = await self.memory.places.channel(interaction.channel_id)
            old = chan.settings.get(name)
            await self.memory.places.update_channel(
                interaction.channel_id,
                interaction.guild_id,
                settings={**chan.settings, name: parsed},
            )
        await audit(interaction, f"settings.set {scope} {name}", old, parsed)
        await say_privately(interaction, f"`{name}` is now **{parsed}** for this {scope}.")

    @settings_group.command(name="reset", description="Back to the defaults")
    async def settings_reset(
        self, interaction: discord.Interaction, scope: Literal["server", "channel"] = "channel"
    ) -> None:
        assert interaction.guild_id is not None and interaction.channel_id is not None
        if scope == "server":
            old = (await self.memory.places.guild(interaction.guild_id)).settings
            await self.memory.places.update_guild(interaction.guild_id, settings={})
        else:
            old = (await self.memory.places.channel(interaction.channel_id)).settings
            await self.memory.places.update_channel(
                interaction.channel_id, interaction.guild_id, settings={}
            )
        await audit(interaction, f"settings.reset {scope}", old, {})
        await say_privately(
            interaction, f"Generation settings for this {scope} are back to the defaults."
        )

    # ---- memory -----------------------------------------------------------------------------

    @memory_group.command(name="forget", description="Start fresh here (undo with unforget)")
    async def forget(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        old = (await self.memory.places.channel(interaction.channel_id)).forget_before
        new = await self.memory.turns.forget(interaction.channel_id, interaction.guild_id)
        await audit(interaction, "memory.forget", old, new)
        await say_privately(
            interaction,
            "I forgot this channel's conversation. `/admin memory unforget` brings it back.",
        )

    @memory_group.command(name="unforget", description="Undo the last forget")
    async def unforget(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        old = (await self.memory.places.channel(interaction.channel_id)).forget_before
        if not await self.memory.turns.unforget(interaction.channel_id):
            await say_privately(interaction, "There is no forget to undo here.")
            return
        new = (await self.memory.places.channel(interaction.channel_id)).forget_before
        await audit(interaction, "memory.unforget", old, new)
        await say_privately(interaction, "Restored the conversation from before the last forget.")

    @memory_group.command(name="clear", description="Delete this channel's stored turns")
    async def clear(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        # Every stored turn goes, forgotten ones too (stats would count only the visible ones).
        stored = len(await self.memory.turns.history(interaction.channel_id))
        view = ConfirmClear(interaction.user.id, timeout=self.bot.settings.confirm_timeout)
        await say_privately(
            interaction, f"Delete all {stored} stored turns of this channel for good?", view=view
        )
        await view.wait()
        if not view.confirmed:
            if view.confirmed is None:
                await interaction.edit_original_response(
                    content="Timed out; nothing was deleted.", view=None
                )
            return
        n = await self.memory.turns.clear(interaction.channel_id)
        await audit(interaction, "memory.clear", n, 0)
        await interaction.edit_original_response(content=f"Deleted {n} turns.", view=None)

    @memory_group.command(name="stats", description="Turns, tokens, oldest and newest")
    async def stats(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        s = await self.memory.turns.stats(interaction.channel_id)

        def when(t: float | None) -> str:
            return f"<t:{int(t)}:R>" if t else "never"

        await say_privately(
            interaction,
            f"{s.turns} turns, {s.tokens} tokens; oldest {when(s.oldest)}, "
            f"newest {when(s.newest)}.",
        )
        await audit(interaction, "memory.stats")

    @memory_group.command(name="search", description="What long-term recall finds here")
    @app_commands.describe(query="Words to look for, as if someone had just said them")
    async def search(self, interaction: discord.Interaction, query: str) -> None:
        assert interaction.channel is not None
        if not self.memory.fts:
            await say_privately(
                interaction, "Recall is off: this SQLite build has no full-text search (FTS5)."
            )
            return
        policy = await policy_for(self.bot, interaction.channel, interaction.guild_id)
        settings = policy.settings.applied(self.bot.settings)
        budget = recall_tokens(settings)  # what recall would use here, even where it is off
        found = await recall(
            self.memory,
            interaction.channel.id,
            [query],
            before_id=None,
            budget_tokens=budget,
            exclude_authors=await self.memory.places.blocked_users(interaction.guild_id),
        )
        await audit(interaction, "memory.search", None, query)
        if not found:
            await say_privately(interaction, "Recall finds nothing here for that.")
            return
        status = "" if settings.recall else " (recall is off in this channel)"
        lines = [f"Recall would show{status}:"]
        for turn in found:
            text = " ".join(turn.content.split())
            text = text if len(text) <= 160 else text[:157] + "…"
            who = turn.name or ("the bot" if turn.role == "assistant" else "someone")
            lines.append(f"- <t:{int(turn.created_at)}:d> **{who}**: {text}")
        await say_privately(interaction, "\n".join(lines)[:1990])

    @memory_group.command(name="summary", description="Show or replace the rolling summary")
    @app_commands.describe(text="A new summary in place of the current one; empty shows it")
    async def summary_cmd(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, SUMMARY_MAX_CHARS] | None = None,
    ) -> None:
        assert interaction.channel_id is not None
        if text is None:
            await say_privately(
                interaction, (await describe(self.memory, interaction.channel_id))[:1990]
            )
            return
        text = text.strip()
        if not text or len(text) > SUMMARY_MAX_CHARS:
            await say_privately(
                interaction,
                f"A summary is 1 to {SUMMARY_MAX_CHARS} characters (this one: {len(text)}).",
            )
            return
        old = await self.memory.summaries.get(interaction.channel_id)
        answer = await replace_summary(self.memory, interaction.channel_id, text)
        await audit(interaction, "memory.summary", old.text if old else None, text)
        await say_privately(interaction, answer)

    @memory_group.command(name="export", description="This channel's memory as JSONL")
    async def export(self, interaction: discord.Interaction) -> None:
        assert interaction.channel_id is not None
        count, data = await self.memory.export_jsonl(interaction.channel_id)
        await audit(interaction, "memory.export", None, count)
        await say_privately(
            interaction,
            f"{count} turns.",
            file=discord.File(io.BytesIO(data), f"memory-{interaction.channel_id}.jsonl"),
        )

    # ---- personas ---------------------------------------------------------------------------

    @persona_group.command(name="default", description="The persona channels use unless set")
    async def persona_default(self, interaction: discord.Interaction, name: str) -> None:
        assert interaction.guild_id is not None
        persona = await self.bot.personas.get(name, interaction.guild_id)
        resolved = persona.name if persona else None
        if resolved is None:
            await say_privately(
                interaction, f"There is no persona called {name!r}. See `/persona list`."
            )
            return
        old = (await self.memory.places.guild(interaction.guild_id)).default_persona
        await self.memory.places.update_guild(interaction.guild_id, default_persona=resolved)
        await audit(interaction, "persona.default", old, resolved)
        await say_privately(interaction, f"The server default persona is now **{resolved}**.")

    @persona_group.command(name="imports", description="Whether non-managers may import personas")
    async def persona_imports(
        self, interaction: discord.Interaction, rule: Literal["allow", "deny"]
    ) -> None:
        may = "may" if rule == "allow" else "may not"
        await self._set_guild_rule(
            interaction, "imports_allowed", rule, "persona.imports",
            f"Members without Manage Server {may} import or create personas.",
        )  # fmt: skip

    # ---- access -----------------------------------------------------------------------------

    async def _block(
        self, interaction: discord.Interaction, target: discord.Member | discord.Role, blocked: bool
    ) -> None:
        assert interaction.guild_id is not None
        kind = "role" if isinstance(target, discord.Role) else "user"
        changed = await self.memory.places.set_blocked(
            interaction.guild_id, kind, target.id, blocked
        )
        verb = "block" if blocked else "unblock"
        # what: the target is part of the action; old: what it was before this command
        old = (not blocked) if changed else blocked
        await audit(interaction, f"access.{verb} {kind} {target.id}", old, blocked)
        label = f"<@&{target.id}>" if kind == "role" else f"<@{target.id}>"
        await say_privately(
            interaction,
            f"{label} is {'now' if changed else 'already'} {'blocked' if blocked else 'allowed'}.",
        )

    @access_group.command(name="block", description="Ignore a user or role (nothing is stored)")
    async def block(
        self, interaction: discord.Interaction, target: discord.Member | discord.Role
    ) -> None:
        await self._block(interaction, target, True)

    @access_group.command(name="unblock", description="Serve a blocked user or role again")
    async def unblock(
        self, interaction: discord.Interaction, target: discord.Member | discord.Role
    ) -> None:
        await self._block(interaction, target, False)

    @access_group.command(name="channels", description="Limit the bot to an allow-list of channels")
    async def channels(
        self,
        interaction: discord.Interaction,
        action: Literal["add", "remove", "clear", "show"],
        channel: Channelish | None = None,
    ) -> None:
        assert interaction.guild_id is not None
        old = (await self.memory.places.guild(interaction.guild_id)).channel_allowlist
        new = list(old)
        target = channel.id if channel else interaction.channel_id
        if action == "add" and target not in new:
            new.append(target)
        elif action == "remove" and target in new:
            new.remove(target)
        elif action == "clear":
            new = []
        if new != old:
            await self.memory.places.update_guild(interaction.guild_id, channel_allowlist=new)
            await audit(interaction, f"access.channels {action}", old, new)
        listing = ", ".join(f"<#{c}>" for c in new) or "all channels (no allow-list)"
        await say_privately(interaction, f"The bot serves: {listing}.")

    @access_group.command(name="reset", description="Whether members may /reset in channels")
    async def reset_rule(
        self, interaction: discord.Interaction, rule: Literal["allow", "deny"]
    ) -> None:
        may = "may" if rule == "allow" else "may not"
        await self._set_guild_rule(
            interaction, "reset_allowed", rule, "access.reset",
            f"Members {may} use /reset in this server's channels.",
        )  # fmt: skip

    async def _set_guild_rule(
        self, interaction: discord.Interaction, field: str, rule: str, action: str, said: str
    ) -> None:
        """Store a server's allow/deny rule `field`, audit the change as `action`, answer `said`."""
        assert interaction.guild_id is not None
        allowed = rule == "allow"
        old = getattr(await self.memory.places.guild(interaction.guild_id), field)
        await self.memory.places.update_guild(interaction.guild_id, **{field: allowed})
        await audit(interaction, action, old, allowed)
        await say_privately(interaction, said)

    # ---- model ------------------------------------------------------------------------------

    @model_group.command(name="status", description="Model, memory, queue, speed and uptime")
    async def model_status(self, interaction: discord.Interaction) -> None:
        conv = self.bot.conv
        info = conv.engine.info
        uptime = int(time.time() - self.bot.started_at)
        lines = [
            f"**Model** `{info.model}` ({info.engine} engine)",
            f"dtype {info.dtype_said('?')}, quantization {info.quantization}, device {info.device or '?'}",
            f"memory: {memory_in_use()}",
            f"queue: {conv.engine.queue_length} waiting in the engine, {conv.pending} replies pending",
            f"recent: {summary(conv.recent)}",
            f"uptime: {uptime // 3600}h {uptime % 3600 // 60}m {uptime % 60}s",
        ]
        await audit(interaction, "model.status")
        await say_privately(interaction, "\n".join(lines))

    @model_group.command(name="reload", description="Load a model folder or hub id and swap it in")
    async def model_reload(
        self, interaction: discord.Interaction, model: str | None = None
    ) -> None:
        conv = self.bot.conv
        if model and is_local_path(model) and not is_owner(interaction):
            await say_privately(
                interaction, "Only a bot owner (OWNER_IDS) may load a model from a local path."
            )
            return
        if self._reloading.locked():
            await say_privately(
                interaction, "A reload is already in progress; try again when it is done."
            )
            return
        async with self._reloading:
            old = conv.engine
            target = model or old.info.model
            new = None
            try:
                new = self.bot.make_engine(self.bot.settings, model=target)
                await new.start()  # loads in a thread: the old model keeps answering meanwhile
            except Exception as exc:  # whatever went wrong, the old model stays
                log.warning("reload of %s failed: %s", target, exc)
                if new is not None:
                    with contextlib.suppress(Exception):
                        await new.close()
                await audit(interaction, "model.reload failed", old.info.model, target)
                reason = first_line(exc)[:1500]
                await say_privately(
                    interaction, f"Reload failed, still serving `{old.info.model}`: {reason}"
                )
                return
            conv.set_engine(new)  # replies that start from now on use the new model
            await old.close()  # requests already queued on the old engine finish first
            await audit(interaction, "model.reload", old.info.model, target)
            await say_privately(
                interaction, f"Now serving `{target}` ({new.info.dtype}, {new.info.device})."
            )

    # ---- audit ------------------------------------------------------------------------------

    @app_commands.command(name="audit", description="The most recent admin actions")
    async def audit_cmd(
        self, interaction: discord.Interaction, limit: app_commands.Range[int, 1, 50] = 10
    ) -> None:
        rows = await self.memory.audit.latest(interaction.guild_id, limit)
        if not rows:
            await say_privately(interaction, "No admin actions recorded yet.")
            return
        lines = [
            f"<t:{int(r.created_at)}:f> <@{r.user_id}> `{r.action}`"
            + (f" in <#{r.channel_id}>" if r.channel_id else "")
            + (
                f": {r.old if r.old is not None else 'unset'} → "
                f"{r.new if r.new is not None else 'unset'}"
                if r.old is not None or r.new is not None
                else ""
            )
            for r in rows
        ]
        await say_privately(interaction, "\n".join(lines)[:1990])


def is_local_path(model: str) -> bool:
    """A folder on this machine (absolute, relative or ~), as opposed to a hub id."""
    return model.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(model))


def memory_in_use() -> str:
    # Only ask torch when the engine already loaded it: importing it here would block the event
    # loop for seconds (past Discord's 3 s to answer), and without it no GPU memory is ours.
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            used = torch.cuda.memory_allocated() / 2**30
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            return f"{used:.1f} GiB of {total:.0f} GiB GPU"
    except Exception:  # memory is informational; never fail the status over it
        pass
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
        return f"{rss / 2**20:.1f} GiB process RSS"
    except (OSError, StopIteration):
        return "unknown"


async def setup(bot: HermesBot) -> None:
    await bot.add_cog(Admin(bot))
