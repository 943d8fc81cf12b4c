"""Catch-up: what the bot missed while it was away, and the replies it still owes.

When the bot starts, and whenever the gateway gives it a new session (a resumed one replays
what it missed; a new one does not), it reads back each served channel's recent history,
stores what memory lacks and answers what was addressed to it, oldest first, through the normal
queue. Channels memory does not know yet are read too when they had a message inside the
window: server channels and threads the bot can read, taken in where it was mentioned, and the
DMs of members it knows from a server (a bot cannot list its DM channels). Replies owed from before a stop (stored `awaiting` turns, see `bot.store.owed`) are
answered the same way. The rules come first, plain functions of ids and times: how far back to
read, which owed replies are still worth giving, and the in-process claims that keep two paths
(a live event and catch-up) from answering one message twice. `CatchUp` is the Discord side: it
reads the histories, hands what it finds to ingest and the owed replies to the runner, and
adopts a reply that reached the channel just before a stop (SIGKILL after the post, before
storing it) instead of posting it again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import discord

from bot.discord.checks import policy_for, scene_at
from bot.discord.owing import Outcome, OwedReply
from bot.discord.posting import describe_failure
from bot.store.owed import ReplyPost
from bot.store.turns import StoredTurn

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)

#: The `-# note` line a reply may end with (not part of what the model said).
NOTE_LINE = re.compile(r"\n-# [^\n]*\Z")

#: Discord's epoch (2015-01-01T00:00:00Z) in milliseconds: snowflakes count from it.
DISCORD_EPOCH_MS = 1_420_070_400_000


def snowflake_at(timestamp: float) -> int:
    """The smallest snowflake of a moment (seconds since the Unix epoch)."""
    return max(0, int(timestamp * 1000) - DISCORD_EPOCH_MS) << 22


def snowflake_time(snowflake: int) -> float:
    """The moment (seconds since the Unix epoch) a snowflake was made."""
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


def history_floor(newest_stored: int | None, now: float, minutes: float) -> int:
    """Read a channel's history after this message id: after the newest message memory holds,
    and never further back than `minutes` before `now`."""
    oldest = snowflake_at(now - minutes * 60)
    return max(oldest, newest_stored or 0)


@dataclass(slots=True)
class Owed:
    """The stored turns still awaiting a reply, split by whether one is still worth giving."""

    answer: list[StoredTurn]  # oldest first
    expired: list[StoredTurn]  # older than the catch-up window: dropped without a reply


def owed_replies(turns: Iterable[StoredTurn], now: float, minutes: float) -> Owed:
    """Sort the awaiting turns: a question older than the catch-up window is not answered
    late (the conversation has moved on); the rest are, oldest first."""
    cutoff = now - minutes * 60
    answer: list[StoredTurn] = []
    expired: list[StoredTurn] = []
    for turn in sorted(turns, key=lambda t: t.id):
        (answer if turn.created_at >= cutoff else expired).append(turn)
    return Owed(answer, expired)


class Claims:
    """Message ids this process has taken charge of (stored, or answering), newest kept.

    A message can reach the bot twice: as a live event and in catch-up's read of the history
    (or as a stored owed turn while its live answer is still queued). Claiming is synchronous,
    so between two awaits exactly one path wins.
    """

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._ids: OrderedDict[int, None] = OrderedDict()

    def claim(self, message_id: int) -> bool:
        """Take `message_id`; False when it was already taken."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return True

    def release(self, message_id: int) -> None:
        """Give `message_id` back (nothing was done with it after all)."""
        self._ids.pop(message_id, None)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._ids


# ---- the Discord side -------------------------------------------------------------------------


class CatchUp:
    """Reads back what the bot missed and gives the replies it owes; owned by the bot
    (`HermesBot.catch_up`), run by the chat cog on every new gateway session."""

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        self._running = asyncio.Lock()
        self._again = False

    async def run(self) -> None:
        """Store what each served channel got while the bot was away and answer what is owed,
        oldest first, through the normal queue. One run at a time; a session that starts
        during a run gets one more run after it."""
        if self._running.locked():
            self._again = True
            return
        async with self._running:
            again = True
            while again:
                self._again = False
                try:
                    await self._once()
                except (discord.HTTPException, aiohttp.ClientError) as exc:
                    log.warning("catch-up stopped: %s", describe_failure(exc))
                again = self._again

    async def _once(self) -> None:
        bot = self.bot
        memory = bot.memory
        minutes = bot.settings.catchup_minutes
        if minutes <= 0:
            return
        now = time.time()
        read = 0
        orphans: dict[int, list[discord.Message]] = {}
        known = await memory.owed.known_channels()
        async for channel, guild_id, new in self._places(known, now, minutes):
            if (await policy_for(bot, channel, guild_id)).mode == "off":
                continue
            try:
                read += await self._read_back(channel, guild_id, now, minutes, orphans, new=new)
            except (discord.HTTPException, aiohttp.ClientError) as exc:
                # one channel's history out of reach must not keep the others from catching up
                log.warning("catch-up skipped channel %s: %s", channel.id, describe_failure(exc))  # type: ignore[attr-defined]
        owed = owed_replies(await memory.owed.awaiting(), now, minutes)
        for turn in owed.expired:
            await OwedReply(memory.owed, turn.id, turn.message_id).settle(Outcome.GIVEN_UP)
        posts = await memory.owed.posts()
        started = adopted = 0
        answering = bot.replies.answering
        for turn in owed.answer:
            if turn.message_id is None or turn.message_id in answering:
                continue
            channel = await self._channel(turn.channel_id)
            if channel is None:
                continue
            handle = OwedReply(memory.owed, turn.id, turn.message_id)
            if (await policy_for(bot, channel, turn.guild_id)).mode == "off":
                await handle.settle(Outcome.GIVEN_UP)
                continue
            if turn.id in posts and await self._adopt(
                channel, turn, posts[turn.id], orphans.get(turn.channel_id, []), handle
            ):
                adopted += 1
                continue
            answering.add(turn.message_id)
            trigger = channel.get_partial_message(turn.message_id)  # type: ignore[attr-defined]
            # Started in order: each takes its place in the channel's queue before the next.
            bot.track(asyncio.create_task(self._answer(trigger, turn, handle)))
            started += 1
        if read or started or adopted or owed.expired:
            log.info(
                "catch-up: %d recent messages read back, %d owed replies queued, %d found "
                "already posted, %d too old to answer",
                read,
                started,
                adopted,
                len(owed.expired),
            )

    async def _answer(
        self, trigger: discord.PartialMessage, turn: StoredTurn, owed: OwedReply
    ) -> None:
        """Answer a stored turn still owed a reply, as it would have been answered live."""
        bot = self.bot
        scene = await scene_at(bot, trigger.channel, turn.guild_id)
        if scene:
            speakers = await bot.ingest.pick_speakers(scene, turn.content, None, turn.guild_id)
            if not speakers:  # the scene gives nobody the word
                await owed.settle(Outcome.GIVEN_UP)
                bot.replies.answering.discard(trigger.id)
                return
            await bot.replies.answer_scene(trigger, owed, scene, speakers)
            return
        await bot.replies.answer(trigger, owed)

    async def _adopt(
        self,
        channel: discord.abc.Messageable,
        turn: StoredTurn,
        post: ReplyPost,
        orphans: list[discord.Message],
        owed: OwedReply,
    ) -> bool:
        """A reply to `turn` started to post before the bot stopped: when it reached the
        channel, store it as the reply (it is not posted again). Whether it did."""
        after = [m for m in orphans if turn.message_id is not None and m.id > turn.message_id]
        if post.message_id is not None:
            after = [m for m in after if m.id >= post.message_id]
            if not after or after[0].id != post.message_id:
                try:
                    first = await channel.fetch_message(post.message_id)  # type: ignore[attr-defined]
                except discord.NotFound:  # posted, then deleted by someone: answered all the same
                    await owed.settle(Outcome.ANSWERED)
                    return True
                after = [first]
        if not after:
            return False  # nothing reached the channel: answer it now
        first = after[0]
        shown = [first]
        for message in after[1:]:  # the rest of a reply split over several messages
            if message.author.id != first.author.id or message.author.name != first.author.name:
                break
            shown.append(message)
        for message in shown:
            if message in orphans:
                orphans.remove(message)
        name = post.persona or self.bot.conv.bot_name
        prefix = f"**{post.persona}:** " if post.persona else ""
        text = "\n".join(m.content.removeprefix(prefix) for m in shown)
        text = NOTE_LINE.sub("", text)
        await self.bot.conv.record_assistant(
            turn.channel_id,
            text,
            guild_id=turn.guild_id,
            message_ids=[m.id for m in shown],
            persona=post.persona,
            name=name,
            answers=turn.id,
        )
        owed.stored()
        return True

    async def _places(
        self, known: list[tuple[int, int | None]], now: float, minutes: float
    ) -> AsyncIterator[tuple[discord.abc.Messageable, int | None, bool]]:
        """Where to read back, as (channel, guild id, new): the channels memory knows, then
        (`new`) the ones it does not that had a message inside the window: every server
        channel and thread the bot can read, and the DMs of members who spoke lately (a bot
        cannot list its DM channels; `OwedReplies.recent_speakers`, at most CATCHUP_MESSAGES
        of them)."""
        bot = self.bot
        seen = {channel_id for channel_id, _ in known}
        for channel_id, guild_id in known:
            channel = await self._channel(channel_id)
            if channel is not None:
                yield channel, guild_id, False
        floor = snowflake_at(now - minutes * 60)
        for guild in bot.guilds:
            me = guild.me
            if me is None:
                continue
            for place in [*guild.text_channels, *guild.voice_channels, *guild.threads]:
                last = place.last_message_id
                if place.id in seen or last is None or last <= floor:
                    continue
                perms = place.permissions_for(me)
                if perms.read_messages and perms.read_message_history:
                    seen.add(place.id)
                    yield place, guild.id, True
        for user_id in await bot.memory.owed.recent_speakers(bot.settings.catchup_messages):
            try:  # the raw channel: discord.py's DMChannel drops its last message id
                data = await bot.http.start_private_message(user_id)
                last = int(data.get("last_message_id") or 0)
                if int(data["id"]) in seen or last <= floor:
                    continue
                dm = await bot.create_dm(discord.Object(user_id))
            except discord.HTTPException:
                continue  # gone, or not reachable by DM
            seen.add(dm.id)
            yield dm, None, True

    async def _channel(self, channel_id: int) -> discord.abc.Messageable | None:
        bot = self.bot
        channel = bot.get_channel(channel_id)
        if channel is None:
            try:
                channel = await bot.fetch_channel(channel_id)
            except discord.HTTPException:
                return None  # gone, or no longer visible to the bot
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def _read_back(
        self,
        channel: discord.abc.Messageable,
        guild_id: int | None,
        now: float,
        minutes: float,
        orphans: dict[int, list[discord.Message]],
        *,
        new: bool = False,
    ) -> int:
        """Store the messages `channel` got since the newest one memory holds (within the
        window and the cap); returns how many were new. The bot's own posts that memory lacks
        go to `orphans`: replies posted just before a stop, adopted by `_adopt`. A `new`
        channel (none of it stored) is taken in only when it asked for the bot meanwhile: a
        mention in a server channel, any message in a DM."""
        bot = self.bot
        ingest = bot.ingest
        newest = await bot.memory.owed.newest_message_id(channel.id)  # type: ignore[attr-defined]
        floor = history_floor(newest, now, minutes)
        last = getattr(channel, "last_message_id", None)  # from the gateway, when it says
        if last is not None and last <= floor:
            return 0  # nothing new there: no request
        missed = [
            m
            async for m in channel.history(
                limit=bot.settings.catchup_messages,
                after=discord.Object(floor),
                oldest_first=False,
            )
        ]
        missed.reverse()
        if new and not any(self._calls(m) for m in missed):
            return 0
        # A message the bot already replied to (it stopped before storing that) is not owed.
        replied = {
            m.reference.message_id
            for m in missed
            if ingest.is_ours(m) and m.reference is not None and m.reference.message_id
        }
        members: dict[int, discord.Member | None] = {}
        for message in missed:
            if ingest.is_ours(message):
                if await bot.memory.turns.for_message(message.id) is None:
                    orphans.setdefault(channel.id, []).append(message)  # type: ignore[attr-defined]
                continue
            if guild_id is not None and not isinstance(message.author, discord.Member):
                # History carries no member roles, and the access rule needs them.
                if message.author.id not in members:
                    members[message.author.id] = await self._member(message)
                member = members[message.author.id]
                if member is None:
                    continue  # no longer in the server
                message.author = member
            await ingest.take(message, live=False, replied=message.id in replied)
        return len(missed)

    def _calls(self, message: discord.Message) -> bool:
        """A member's message that asks for the bot: any DM, or a mention of it."""
        if self.bot.ingest.is_ours(message) or message.author.bot:
            return False
        me = self.bot.user
        return message.guild is None or (me is not None and me in message.mentions)

    async def _member(self, message: discord.Message) -> discord.Member | None:
        guild = message.guild
        if guild is None:
            return None
        try:
            return guild.get_member(message.author.id) or await guild.fetch_member(
                message.author.id
            )
        except discord.HTTPException:
            return None
