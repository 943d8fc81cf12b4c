"""The bot class, `HermesBot`: the Discord layer's owner of the shared core.

It opens the core once (settings, memory, personas, conversations and the engine inside them)
and the Discord-layer pieces every cog shares (webhooks), as typed attributes, then loads the
cogs, syncs slash commands, answers refused checks and failed commands once for all of them,
and shuts everything down cleanly. Cogs talk to each other only through these attributes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import metrics
from bot.clock import Clock, SystemClock
from bot.conversation import Conversations
from bot.discord.answering import DeferringTree, say_privately
from bot.discord.catchup import CatchUp
from bot.discord.checks import Refused
from bot.discord.idle import IdleReplies
from bot.discord.ingest import Ingest
from bot.discord.replying import Replier
from bot.discord.stopping import StopButton
from bot.discord.swipes import SwipeButton, Swipes
from bot.discord.webhooks import Webhooks
from bot.engine import Engine, EngineError, EngineFactory, make_engine
from bot.memory import Memory
from bot.personas import PersonaLibrary, load_builtin_personas
from bot.settings import Settings
from bot.speakers import Member
from bot.summaries import Summarizer

log = logging.getLogger(__name__)

# A text bot: discord.py's "PyNaCl/davey is not installed, voice will NOT be supported" warnings
# at start only worry users about a feature it never uses.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

#: Exit status when Discord cannot be reached at start (EX_TEMPFAIL): a service manager that
#: restarts on failure (the systemd unit, Docker's restart policy) tries again later.
EXIT_UNREACHABLE = 75

#: What a member is told when a check other than ours (e.g. `guild_only`) refuses a command.
NOT_ALLOWED = "You can't use that command here."

COGS = ("cogs.chat", "cogs.personas", "cogs.admin", "cogs.notes", "cogs.help")


def intents() -> discord.Intents:
    """What the bot must receive: guilds, guild and DM messages, and their content."""
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_messages = True
    wanted.dm_messages = True
    wanted.message_content = True  # privileged: enable it in the developer portal
    wanted.members = False
    return wanted


class HermesBot(commands.AutoShardedBot):
    """Carries the shared core for the cogs; every attribute below is set before a cog loads.

    `settings`, `memory`, `personas`, `conv` (the conversations, which hold the engine; `engine`
    reads and swaps it there), and the Discord layer's shared parts: `webhooks` (persona
    identities), `swipes` (alternative replies), `ingest` (message events into stored turns),
    `replies` (the reply runner), `catch_up` (what was missed while away), `summaries` (the
    rolling summaries' background writer, `bot.summaries`), `idle` (unprompted replies, on
    `clock`); `metrics` when enabled. Cogs reach each other's work only through these.
    `options` go to discord.py's
    `AutoShardedBot`.
    """

    memory: Memory
    personas: PersonaLibrary
    conv: Conversations
    webhooks: Webhooks
    swipes: Swipes
    ingest: Ingest
    replies: Replier
    catch_up: CatchUp
    idle: IdleReplies
    summaries: Summarizer

    def __init__(
        self,
        settings: Settings,
        *,
        engine: Engine | None = None,
        engine_factory: EngineFactory = make_engine,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        **options: Any,
    ) -> None:
        """`engine`: the engine to start with (default: `engine_factory(settings)`);
        `engine_factory`: builds an engine for settings and a model name, for that first one
        and for each `/admin model reload`; `clock`: the time unprompted replies wait on
        (`bot.clock`, default the system clock); `rng`: their IDLE_CHANCE draws (default a
        fresh `random.Random`)."""
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents(),
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            tree_cls=DeferringTree,  # every command is acknowledged before it runs
            shard_count=settings.shard_count or None,
            **options,
        )
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self._idle_task: asyncio.Task[None] | None = None
        #: the engine until `setup_hook` hands it to the conversations, which then hold it
        self.make_engine = engine_factory
        self._engine: Engine | None = engine or engine_factory(settings)
        self.started_at = time.time()
        self.reply_tasks: set[asyncio.Task[None]] = set()
        #: Replies still waiting for their channel's turn (a subset of `reply_tasks`).
        self.waiting_replies: set[asyncio.Task[Any]] = set()
        self.engine_ready = asyncio.Event()
        self.metrics: metrics.Metrics | None = None
        self._memory_open = False

    @property
    def engine(self) -> Engine:
        """The engine serving now (held by the conversations once the bot has started)."""
        return self._engine if self._engine is not None else self.conv.engine

    async def setup_hook(self) -> None:
        self.tree.on_error = self.on_app_command_error
        self.memory = await Memory.open(self.settings.db_path)
        self._memory_open = True
        engine = self.engine
        await engine.start()
        for note in engine.info.notes:  # which engine and why; what reaches a server
            log.info("%s", note)
        builtins, problems = load_builtin_personas(self.settings.personas_dir)
        for problem in problems:  # a bad persona file is skipped, never fatal
            log.warning("persona skipped: %s", problem)
        self.personas = PersonaLibrary(builtins, self.memory)
        self.conv = Conversations(
            self.settings,
            self.memory,
            engine,
            personas=self.personas,
            members=self.cached_members,
        )
        self._engine = None
        self.webhooks = Webhooks(self, self.memory, self.personas)
        await self.webhooks.load()
        self.swipes = Swipes(self)
        self.replies = Replier(self)
        self.ingest = Ingest(self)
        self.catch_up = CatchUp(self)
        self.summaries = Summarizer(self.conv)  # rolling summaries, in the background
        self.summaries.start()
        self.idle = IdleReplies(self, self.clock, self.rng)
        self._idle_task = asyncio.create_task(self.idle.run(), name="unprompted replies")
        # swipe and ⏹ buttons are answered on replies from earlier runs too
        self.add_dynamic_items(SwipeButton, StopButton)
        self.metrics = metrics.setup(self.settings, lambda: self.engine)
        self.engine_ready.set()
        for name in COGS:
            try:
                await self.load_extension(name)
            except commands.ExtensionNotFound:
                log.warning("cog %s not found, skipped", name)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """To DEV_GUILD_ID when set (instant), else globally (may take a while to show up)."""
        if self.settings.dev_guild_id:
            guild = discord.Object(self.settings.dev_guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()
        log.info("synced %d application commands", len(synced))

    def cached_members(self, guild_id: int | None) -> list[Member]:
        """The server's members in discord.py's cache (the bot itself left out), with their
        display, global and user names: names no line of untrusted text may start as, even
        when their owner never spoke where the bot listens (`bot.speakers`)."""
        guild = self.get_guild(guild_id) if guild_id is not None else None
        if guild is None:
            return []
        me = self.user.id if self.user is not None else None
        return [
            Member(m.id, (m.display_name, m.global_name or "", m.name))
            for m in guild.members
            if m.id != me
        ]

    def track(self, task: asyncio.Task[None]) -> None:
        self.reply_tasks.add(task)
        task.add_done_callback(self.reply_tasks.discard)

    async def close(self) -> None:
        """Let replies in progress finish for a moment, cancel the rest, then close the core.

        Replies still waiting in a queue are cancelled at once: they stay stored as owed, and
        catch-up answers them after the next start.
        """
        if self._idle_task is not None:
            self._idle_task.cancel()
        for task in list(self.waiting_replies):
            task.cancel()
        if self.reply_tasks:
            _, pending = await asyncio.wait(set(self.reply_tasks), timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if hasattr(self, "summaries"):
            await self.summaries.close()
        await super().close()
        if self.metrics is not None:
            self.metrics.stop()
        with contextlib.suppress(Exception):
            await self.engine.close()
        if self._memory_open:
            self._memory_open = False
            await self.memory.close()

    async def on_app_command_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        """A refused check gets its one line, privately; anything else a short private apology.

        Every command was deferred (`DeferringTree`), so each ends with an answer: a placeholder
        left "thinking…" would never go away."""
        if isinstance(error, app_commands.CheckFailure):
            reason = str(error) if isinstance(error, Refused) else NOT_ALLOWED
            with contextlib.suppress(discord.HTTPException):
                await say_privately(interaction, reason)
            return
        name = interaction.command.qualified_name if interaction.command else "?"
        log.error("command /%s failed in channel %s", name, interaction.channel_id, exc_info=error)
        with contextlib.suppress(discord.HTTPException):
            await say_privately(interaction, "Sorry, that command failed; the error was logged.")

    async def on_message(self, message: discord.Message, /) -> None:
        """No prefix commands: "@bot help me" is a chat message for the chat cog, not a command."""

    async def on_ready(self) -> None:
        """A new gateway session (the first, or after one could not be resumed); the chat cog
        catches up on what it missed."""
        log.info(
            "logged in as %s (%s) in %d servers",
            self.user,
            getattr(self.user, "id", "?"),
            len(self.guilds),
        )

    async def on_resumed(self) -> None:
        """The session was resumed: Discord replays what was missed, nothing to catch up."""
        log.info("gateway session resumed")


async def serve(settings: Settings, bot: HermesBot | None = None) -> int:
    bot = bot or HermesBot(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(bot.start(settings.discord_token))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            runner.result()  # raises LoginFailure etc.
        log.info("shutting down")
        return 0
    finally:
        stopper.cancel()
        if not bot.is_closed():
            await bot.close()
        if not runner.done():
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner


def run_bot(settings: Settings) -> int:
    """`hermes-bot run`: exit 2 with a clear line for a bad token or model, never a traceback."""
    try:
        return asyncio.run(serve(settings))
    except discord.LoginFailure:
        log.error(
            "Discord rejected DISCORD_TOKEN (improper token). Reset it in the developer "
            "portal and update .env."
        )
        return 2
    except discord.PrivilegedIntentsRequired:
        log.error(
            "Enable the Message Content intent for this bot in the Discord developer "
            "portal (Bot → Privileged Gateway Intents)."
        )
        return 2
    except EngineError as exc:
        log.error("%s", exc)
        return 2
    except (OSError, discord.GatewayNotFound, discord.DiscordServerError) as exc:
        # aiohttp's connection errors (DNS, refused, reset, TLS) are OSErrors
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error(
            "cannot reach Discord (%s); check the network. Exiting with status %d so a service "
            "manager restarts the bot later.",
            reason,
            EXIT_UNREACHABLE,
        )
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
