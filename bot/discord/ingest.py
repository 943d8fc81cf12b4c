"""Ingest: Discord message events become stored turns, and the ones to answer become owed replies.

The one path for live events and for messages catch-up reads back (`Ingest.take`): it applies
the channel policy (mode, access and ALLOWED_ROLES, scenes: naming a cast member addresses it
in any mode but `off`, wake words, the per-member cooldown, out-of-character lines stored hidden
and never answered; other bots only when ALLOW_BOTS lists them, at most BOT_CHAIN replies to
bots per human message, and never the bot's own posts or persona webhooks), reads attachments in, stores the member's turn
and, when the bot should answer, hands back an `OwedReply` for the runner (`bot.discord.replying`). Messages of one channel are taken in the
order Discord sent them (one at a time per channel), so a later message's turn never lands
before an earlier one's and anything decided about a message is settled before the next one
of its channel is looked at. Edits and deletes follow the stored turns, also when they overtake
the message's own event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import discord

from bot.discord.attachments import message_images, message_text
from bot.discord.catchup import Claims
from bot.discord.checks import policy_for, scene_at
from bot.discord.owing import OwedReply
from bot.discord.threads import open_thread
from bot.policy import ChannelPolicy, out_of_character
from bot.scenes import Scene, SceneMember, mentions_any, speakers_for

if TYPE_CHECKING:
    from bot.discord.client import HermesBot

log = logging.getLogger(__name__)

#: Edits and deletes remembered for messages whose own event has not been stored yet.
OVERTAKEN_KEPT = 1000


@dataclass(slots=True)
class ToAnswer:
    """A member's message the bot will answer: its owed reply, and in a scene who speaks
    (picked now for a live message; catch-up picks when it answers)."""

    owed: OwedReply
    scene: Scene | None = None
    speakers: list[SceneMember] = field(default_factory=list)
    #: where the reply goes when not the message's channel: the thread it opened
    #: (`bot.discord.threads`, a `threads` channel)
    channel: discord.Thread | None = None


class Ingest:
    """Takes message events in; owned by the bot (`HermesBot.ingest`)."""

    def __init__(self, bot: HermesBot) -> None:
        self.bot = bot
        #: Messages this process has taken in (a live event or catch-up, whichever came first).
        self.claims = Claims()
        #: author id -> time of their last message that asked for a reply (USER_COOLDOWN)
        self.last_trigger: dict[int, float] = {}
        #: channel id -> replies given there to ALLOW_BOTS bots since its last human message
        self.bot_replies: dict[int, int] = {}
        #: message id -> its edited text, or None if deleted, for messages not stored yet
        self.overtaken: OrderedDict[int, str | None] = OrderedDict()
        self.rng = random.Random()  # the `natural` scene policy's draws
        #: channel id -> (its lock, how many messages hold or wait for it)
        self._channels: dict[int, tuple[asyncio.Lock, list[int]]] = {}

    # ---- whose message ----------------------------------------------------------------------

    def is_ours(self, message: discord.Message) -> bool:
        """Posted by the bot itself or through one of its webhooks."""
        me = self.bot.user
        if me is not None and message.author.id == me.id:
            return True
        return message.webhook_id is not None and message.webhook_id in self.bot.webhooks.ids

    async def addressed(self, message: discord.Message) -> bool:
        """Mentioned, or a reply to one of the bot's messages (its own or its webhooks')."""
        me = self.bot.user
        if me is not None and me in message.mentions:
            return True
        ref = message.reference
        if ref is None or ref.message_id is None:
            return False
        resolved = ref.resolved
        if isinstance(resolved, discord.Message) and self.is_ours(resolved):
            return True
        turn = await self.bot.memory.turns.for_message(ref.message_id)
        return turn is not None and turn.role == "assistant"

    async def replied_persona(self, message: discord.Message) -> str | None:
        """The persona whose reply `message` answers (a Discord reply to it), if any."""
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        turn = await self.bot.memory.turns.for_message(ref.message_id)
        return turn.persona if turn is not None and turn.role == "assistant" else None

    def woken(self, policy: ChannelPolicy, text: str, scene: Scene) -> bool:
        """WAKE_WORDS: the message names the bot, its persona, a cast member or an extra word."""
        values = policy.settings.values
        if not values.get("wake_words"):
            return False
        me = self.bot.user
        words = [self.bot.conv.bot_name, policy.persona or "", *scene.names()]
        words += [n for m in scene.active for n in m.nicknames]
        if me is not None:
            words += [me.name, getattr(me, "display_name", "")]
        words += str(values.get("wake_extra") or "").split(",")
        return mentions_any(text, [w for w in words if w and w.strip()])

    def answer_bot(self, channel_id: int, live: bool) -> bool:
        """The loop guard: whether a message an allowed bot addressed to this one is answered.
        At most BOT_CHAIN replies to bots per channel between two human messages there, so two
        bots that answer each other stop (as SCENE_CHAIN bounds personas); catch-up answers
        no bot, not knowing how many replies the bots had before."""
        done = self.bot_replies.get(channel_id, 0)
        if not live or done >= self.bot.settings.bot_chain:
            if live:
                log.info("channel %s: bot-to-bot loop guard (BOT_CHAIN) reached", channel_id)
            return False
        self.bot_replies[channel_id] = done + 1
        return True

    def cooling(self, message: discord.Message) -> bool:
        """Whether the author asked for a reply less than USER_COOLDOWN before (or after) this
        message; by the messages' own times, so catch-up judges a burst as it happened."""
        at = message.created_at.timestamp()
        last = self.last_trigger.get(message.author.id)
        if last is not None and abs(at - last) < self.bot.settings.user_cooldown:
            return True
        self.last_trigger[message.author.id] = at
        return False

    # ---- taking a message in ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def in_order(self, channel_id: int) -> AsyncIterator[None]:
        """One message of a channel at a time, in arrival order (asyncio.Lock is first-in
        first-out, and a message's task asks for it before its first await)."""
        lock, users = self._channels.setdefault(channel_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._channels[channel_id]

    async def take(
        self, message: discord.Message, *, live: bool = True, replied: bool = False
    ) -> ToAnswer | None:
        """Store a member's message where the bot serves; returns what to answer when the bot
        should answer it (its turn is then stored owed a reply).

        `live=False`: read back by catch-up (answered later, from memory, oldest first). A
        message seen twice (a replayed dispatch, or both paths) is taken once. `replied`: the
        bot's reply to it is already in the channel (it stopped before storing that), so it is
        stored but not owed.
        """
        if live:
            self.bot.idle.saw(message.channel.id)  # any message ends a silence
        if self.is_ours(message):
            return None  # the bot's own posts are stored by the runner that posts them
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return None
        if not self.claims.claim(message.id):
            return None
        answering = self.bot.replies.answering
        try:
            async with self.in_order(message.channel.id):
                return await self._take(message, live=live, replied=replied)
        except BaseException:
            self.claims.release(message.id)
            answering.discard(message.id)
            raise

    async def _take(
        self, message: discord.Message, *, live: bool, replied: bool
    ) -> ToAnswer | None:
        bot = self.bot
        memory = bot.memory
        guild_id = message.guild.id if message.guild else None
        policy = await policy_for(bot, message.channel, guild_id, message.author)
        if policy.mode == "off" or policy.refusal is not None:
            return None
        from_bot = message.author.bot or message.webhook_id is not None
        if from_bot and message.author.id not in (policy.settings.values.get("allow_bots") or ()):
            return None  # another bot (or webhook) nobody listed in ALLOW_BOTS: not even stored
        if not from_bot:
            self.bot_replies.pop(message.channel.id, None)  # a human spoke: bots may be answered
            if live:  # human talk: a silence after it may bring an unprompted reply
                bot.idle.heard(message.channel.id, float(policy.settings.values["idle_minutes"]))
        if await memory.turns.for_message(message.id) is not None:
            return None  # a dispatch seen twice (e.g. replayed after a reconnect)
        text = await message_text(message, bot.user, bot.settings.attachment_kb)
        if not text:
            return None
        owed = False
        scene: Scene | None = None
        speakers: list[SceneMember] = []
        # an out-of-character line is kept, hidden from the bot, and never answered
        ooc = out_of_character(text, str(policy.settings.values.get("ooc_prefixes") or ""))
        if not replied and not ooc:
            scene = await scene_at(bot, message.channel, guild_id)
            said = message.clean_content  # names count in what was written, not in attachments
            # naming cast members addresses them in any mode but off; WAKE_WORDS is for the rest
            named = bool(scene) and bool(scene.named(said))
            called = named or await self.addressed(message) or self.woken(policy, said, scene)
            owed = policy.mode == "always" or called
            if owed and scene and live:  # catch-up picks when it answers
                replied_to = await self.replied_persona(message)
                speakers = await self.pick_speakers(scene, said, replied_to, guild_id)
                owed = bool(speakers)
        if owed and from_bot and not self.answer_bot(message.channel.id, live):
            owed = False
        if owed and self.cooling(message):
            owed = False
            with contextlib.suppress(discord.HTTPException):
                await message.add_reaction("⏳")
        if owed and live:
            bot.replies.answering.add(message.id)  # before it is stored: catch-up must not take it
        thread: discord.Thread | None = None
        if owed and live and policy.mode == "threads" and not scene and message.guild:
            # the conversation moves to a thread: the message is its first turn
            thread = await open_thread(message, text)
        turn_id = await bot.conv.record_user(
            thread.id if thread is not None else message.channel.id,
            text,
            name=message.author.display_name,
            author_id=message.author.id,
            guild_id=guild_id,
            message_id=message.id,
            awaiting=owed,
            aliases=(message.author.global_name, message.author.name),
            hidden=ooc,
        )
        if bot.settings.vision and message.attachments:  # for a vision model to see
            images = await message_images(message.attachments, bot.settings.image_kb)
            if images:
                await memory.images.add(turn_id, images)
        if message.id in self.overtaken:  # edited or deleted while we were storing it
            if (late := self.overtaken.pop(message.id)) is None:
                await memory.turns.delete(turn_id)
                bot.replies.answering.discard(message.id)
                return None
            await bot.conv.edit(message.id, late)
        if not owed:
            return None
        return ToAnswer(OwedReply(memory.owed, turn_id, message.id), scene, speakers, thread)

    async def pick_speakers(
        self, scene: Scene, said: str, replied_to: str | None, guild_id: int | None
    ) -> list[SceneMember]:
        """The cast members who answer `said` in this channel's scene (the round moves on)."""
        speakers = speakers_for(scene, said, replied_to=replied_to, pick=True, rng=self.rng)
        state = scene.state
        if state.policy in ("list", "manual"):  # the pick moved the round or used the choice
            await self.bot.memory.scenes.update(
                state.channel_id,
                guild_id,
                next_seat=state.next_seat,
                manual_next=state.manual_next,
            )
        return speakers

    # ---- edits and deletes ------------------------------------------------------------------

    async def edited(self, payload: discord.RawMessageUpdateEvent) -> None:
        """A member edited a message: the stored turn follows (the next prompt sees the edit)."""
        if payload.message.author.bot:
            return
        bot = self.bot
        text = await message_text(payload.message, bot.user, bot.settings.attachment_kb)
        if not await bot.conv.edit(payload.message_id, text):
            self._overtaken(payload.message_id, text)

    async def deleted(self, message_ids: list[int]) -> None:
        """Messages were deleted: their turns go too."""
        for message_id in message_ids:
            if not await self.bot.memory.turns.delete_message(message_id):
                self._overtaken(message_id, None)

    def _overtaken(self, message_id: int, content: str | None) -> None:
        """An edit or delete that overtook the message's own event (each runs as its own task)."""
        self.overtaken[message_id] = content
        while len(self.overtaken) > OVERTAKEN_KEPT:
            self.overtaken.popitem(last=False)
