"""Tests of tests/fake_discord/: the real discord.py client against the fake Discord."""

from __future__ import annotations

import asyncio
import io
import json
import time

import aiohttp
import discord
import pytest
from discord import app_commands

from tests.fake_discord import (
    FakeDiscord,
    FakeFile,
    connected_client,
    running_fake,
    start_client,
)
from tests.world import World


class Recorder(discord.Client):
    """A plain client that records the messages it sees and can answer simple commands."""

    def __init__(self, **options: object) -> None:
        super().__init__(intents=discord.Intents.all(), guild_ready_timeout=0.05, **options)
        self.seen: list[discord.Message] = []
        self.tree = app_commands.CommandTree(self)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py's default sleeps 5 s before every re-IDENTIFY; tests need not wait."""

    async def on_message(self, message: discord.Message) -> None:
        self.seen.append(message)
        if message.content == "menu":
            await message.channel.send("menu", view=EditView())
        if message.content == "read" and message.attachments:
            data = await message.attachments[0].read()
            await message.channel.send(f"read {len(data)} bytes: {data.decode()}")


class EditModal(discord.ui.Modal, title="Edit"):
    text = discord.ui.TextInput(label="Text", custom_id="text")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"got {self.text.value}")


class EditView(discord.ui.View):
    @discord.ui.button(label="Edit", custom_id="edit")
    async def edit(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        await interaction.response.send_modal(EditModal())


async def test_connects_and_gets_ready_with_guilds(fake: FakeDiscord, world: World) -> None:
    thread = fake.add_thread(world.general.id, "a thread")
    client = Recorder()
    async with connected_client(client, fake):
        assert client.user is not None and client.user.id == fake.bot_user.id
        guild = client.get_guild(world.guild.id)
        assert guild is not None and guild.name == "Test Guild"
        assert guild.get_channel(world.general.id).name == "general"
        assert guild.get_thread(thread.id).parent_id == world.general.id
        assert guild.get_member(world.alice.id).name == "alice"
        assert guild.me.guild_permissions.manage_webhooks
        assert client.application_id == fake.application_id
        await fake.wait_for(lambda: fake.heartbeat_count >= 1)
    assert fake.gateway_connections[0][1]["compress"] in ("zlib-stream", "zstd-stream")
    assert fake.identify_count == 1 and not fake.unknown_routes


async def test_receives_message_create_with_mentions(fake: FakeDiscord, world: World) -> None:
    role = fake.add_role(world.guild.id, "helpers", mentionable=True)
    client = Recorder()
    async with connected_client(client, fake):
        bot = fake.bot_user
        sent = await fake.user_message(
            world.general.id, world.alice, f"hey {bot.mention} and {role.mention}"
        )
        await fake.wait_for(lambda: client.seen)
        msg = client.seen[0]
        assert msg.id == sent.id and msg.content == sent.content
        assert msg.author.id == world.alice.id and isinstance(msg.author, discord.Member)
        assert [u.id for u in msg.mentions] == [bot.id]
        assert [r.id for r in msg.role_mentions] == [role.id]

        reply = await fake.user_message(world.general.id, world.alice, "again", reply_to=sent)
        await fake.wait_for(lambda: len(client.seen) == 2)
        assert client.seen[1].reference.message_id == sent.id
        assert client.seen[1].id == reply.id


async def test_message_content_intent_is_enforced(fake: FakeDiscord, world: World) -> None:
    intents = discord.Intents.default()  # no message_content
    client = discord.Client(intents=intents, guild_ready_timeout=0.05)
    seen: list[discord.Message] = []
    client.event(_collector(seen))
    async with connected_client(client, fake):
        await fake.user_message(world.general.id, world.alice, "secret")
        await fake.user_message(world.general.id, world.alice, f"{fake.bot_user.mention} hi")
        await fake.wait_for(lambda: len(seen) == 2)
    assert seen[0].content == "" and seen[1].content.endswith("hi")


def _collector(seen: list[discord.Message]):  # noqa: ANN202 - a discord.py event handler
    async def on_message(message: discord.Message) -> None:
        seen.append(message)

    return on_message


async def test_send_stores_message_and_allowed_mentions(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        channel = client.get_channel(world.general.id)
        sent = await channel.send(
            f"hi {world.alice.mention}", allowed_mentions=discord.AllowedMentions.none()
        )
        stored = fake.get_message(sent.id)
        assert stored.content == f"hi {world.alice.mention}" and stored.author.bot
        assert stored.allowed_mentions == {"parse": []}
        assert stored.mentions == [] and sent.mentions == []
        request = fake.find_requests("POST", "/channels/{c}/messages")[-1]
        assert request.allowed_mentions == {"parse": []}

        pinged = await channel.send(f"hi {world.alice.mention}")
        assert [u.id for u in pinged.mentions] == [world.alice.id]

        await fake.wait_for(lambda: any(m.id == pinged.id for m in client.seen))  # echoed
        history = [m async for m in channel.history(limit=1)]
        assert [m.id for m in history] == [pinged.id]


async def test_too_long_content_is_rejected_like_discord(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        channel = client.get_channel(world.general.id)
        with pytest.raises(discord.HTTPException) as err:
            await channel.send("x" * 2001)
        assert err.value.status == 400 and err.value.code == 50035
        assert "Must be 2000 or fewer in length." in str(err.value)
        with pytest.raises(discord.HTTPException) as err:
            await channel.send(embed=discord.Embed(description="y" * 4097))
        assert err.value.code == 50035
        await channel.send("x" * 2000)
        assert len(fake.channel_messages(world.general.id)) == 1


async def test_injected_429_on_edit_is_retried(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        message = await client.get_channel(world.general.id).send("draft")
        injection = fake.inject(
            "PATCH", "/channels/{channel_id}/messages/{message_id}", 429, retry_after=0.05
        )
        started = time.monotonic()
        await message.edit(content="final")
        assert time.monotonic() - started < 1.0
        assert injection.hits == 1
        assert [r.status for r in fake.find_requests("PATCH")] == [429, 200]
        stored = fake.get_message(message.id)
        assert stored.content == "final" and stored.history == ["draft"]


async def test_injected_500_is_retried(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        fake.inject("POST", "/channels/{channel_id}/messages", 500)
        await client.get_channel(world.general.id).send("after a 500")  # ~1 s: discord.py's backoff
        posts = fake.find_requests("POST", "/channels/{channel_id}/messages")
        assert [r.status for r in posts] == [500, 200]
        assert fake.last_message(world.general.id).content == "after a 500"


async def test_gateway_drop_resumes_and_replays_exactly_once(
    fake: FakeDiscord, world: World
) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        await fake.disconnect_gateway()
        missed = await fake.user_message(world.general.id, world.alice, "while you were away")
        await fake.wait_for(lambda: fake.resume_count == 1)
        await fake.wait_for(lambda: client.seen)
        after = await fake.user_message(world.general.id, world.alice, "welcome back")
        await fake.wait_for(lambda: len(client.seen) == 2)
        await asyncio.sleep(0.05)
        assert [m.id for m in client.seen] == [missed.id, after.id]
        assert fake.identify_count == 1
        assert fake.gateway_connections[-1][0] == "/gateway-resume"


async def test_invalid_session_makes_the_client_identify_again(
    fake: FakeDiscord, world: World
) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        await fake.disconnect_gateway(resumable=False)
        await fake.wait_for(lambda: fake.identify_count == 2)
        await fake.wait_connected()
        await fake.user_message(world.general.id, world.alice, "fresh session")
        await fake.wait_for(lambda: client.seen)


async def test_slash_command_from_tree_sync(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    persona = app_commands.Group(name="persona", description="Personas")

    @persona.command(name="use", description="Switch persona")
    @app_commands.describe(name="Persona name", strength="How much")
    async def use(interaction: discord.Interaction, name: str, strength: int = 1) -> None:
        await interaction.response.send_message(f"now {name} x{strength}", ephemeral=True)

    @use.autocomplete("name")
    async def names(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return [
            app_commands.Choice(name=n, value=n) for n in ("Aria", "Bob") if n.startswith(current)
        ]

    @app_commands.command(name="slow", description="Defers, then answers")
    async def slow(interaction: discord.Interaction, who: discord.Member) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.followup.send(f"done for {who.name}")

    guild = discord.Object(world.guild.id)
    client.tree.add_command(persona, guild=guild)
    client.tree.add_command(slow, guild=guild)
    async with connected_client(client, fake):
        await client.tree.sync(guild=guild)
        assert {c["name"] for c in fake.commands(world.guild.id)} == {"persona", "slow"}

        handle = await fake.invoke_command(
            world.general.id, world.alice, "persona use", {"name": "Aria", "strength": 3}
        )
        response = await handle.wait_response()
        assert response.type == 4 and response.content == "now Aria x3" and response.ephemeral
        assert handle.original is not None and handle.original.ephemeral

        choices = await fake.autocomplete(
            world.general.id, world.alice, "persona use", {"name": "A"}, focused="name"
        )
        assert choices == [{"name": "Aria", "value": "Aria"}]

        handle = await fake.invoke_command(
            world.general.id, world.alice, "slow", {"who": world.alice}
        )
        assert (await handle.wait_response()).type == 5
        final = await handle.wait_message()
        assert final.content == "done for alice" and not final.ephemeral
        assert fake.last_message(world.general.id).id == final.id


async def test_button_then_modal_then_response(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        await fake.user_message(world.general.id, world.alice, "menu")
        menu = await fake.wait_for(
            lambda: next((m for m in fake.channel_messages(world.general.id) if m.components), None)
        )
        click = await fake.click_button(menu, "edit", world.alice)
        assert (await click.wait_response()).type == 9
        submit = await fake.submit_modal(click, {"text": "hello"})
        assert (await submit.wait_response()).content == "got hello"


async def test_webhook_create_execute_edit_delete(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        channel = client.get_channel(world.general.id)
        hook = await channel.create_webhook(name="Hermes")
        assert fake.webhooks[hook.id].name == "Hermes"
        sent = await hook.send(
            "in character",
            username="Aria",
            avatar_url="https://example.invalid/aria.png",
            wait=True,
        )
        stored = fake.get_message(sent.id)
        assert stored.webhook_id == hook.id and stored.username == "Aria"
        assert stored.avatar_url == "https://example.invalid/aria.png"
        await fake.wait_for(lambda: any(m.webhook_id == hook.id for m in client.seen))
        echoed = next(m for m in client.seen if m.webhook_id == hook.id)
        assert echoed.author.name == "Aria"

        partial = discord.Webhook.partial(hook.id, hook.token, client=client)
        await partial.edit_message(sent.id, content="edited")
        thread = fake.add_thread(world.general.id, "side plot")
        in_thread = await discord.Webhook.from_url(fake.webhooks[hook.id].url, client=client).send(
            "in a thread", username="Bob", thread=discord.Object(thread.id), wait=True
        )
        assert fake.last_message(thread.id).id == in_thread.id
        assert fake.get_message(sent.id).content == "edited"
        await partial.delete_message(sent.id)
        assert fake.get_message(sent.id).deleted

        fake.deny_bot_permissions(world.general.id, "manage_webhooks")
        await fake.wait_for(lambda: not channel.permissions_for(channel.guild.me).manage_webhooks)
        with pytest.raises(discord.Forbidden) as err:
            await channel.create_webhook(name="Another")
        assert err.value.code == 50013


async def test_direct_messages_both_ways(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        user = await client.fetch_user(world.alice.id)
        await user.send("hello alice")
        dm = fake.dm_channel(world.alice)
        assert fake.last_message(dm.id).content == "hello alice"

        await fake.user_message(dm.id, world.alice, "hello bot")
        await fake.wait_for(lambda: any(m.content == "hello bot" for m in client.seen))
        received = next(m for m in client.seen if m.content == "hello bot")
        assert isinstance(received.channel, discord.DMChannel) and received.guild is None


async def test_attachments_download_and_upload(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    async with connected_client(client, fake):
        await fake.user_message(
            world.general.id, world.alice, "read", attachments=[FakeFile("note.txt", b"payload")]
        )
        await fake.wait_for(lambda: fake.last_message(world.general.id).author.bot)
        assert fake.last_message(world.general.id).content == "read 7 bytes: payload"

        channel = client.get_channel(world.general.id)
        await channel.send("file", file=discord.File(io.BytesIO(b"abc"), "a.txt"))
        attachment = fake.last_message(world.general.id).attachments[0]
        assert (attachment.filename, attachment.data) == ("a.txt", b"abc")


async def test_user_edits_deletes_and_reactions_reach_the_client(
    fake: FakeDiscord, world: World
) -> None:
    client = Recorder()
    events: list[tuple[str, int]] = []

    @client.event
    async def on_message_edit(before: discord.Message, after: discord.Message) -> None:
        events.append(("edit:" + after.content, after.id))

    @client.event
    async def on_raw_message_delete(payload: discord.RawMessageDeleteEvent) -> None:
        events.append(("delete", payload.message_id))

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        events.append(("react:" + str(payload.emoji), payload.message_id))

    async with connected_client(client, fake):
        msg = await fake.user_message(world.general.id, world.alice, "typo")
        await fake.wait_for(lambda: client.seen)
        await fake.edit_user_message(msg, "fixed")
        await fake.add_reaction(msg, world.alice, "👍")
        await fake.delete_message(msg)
        await fake.wait_for(lambda: len(events) == 3)
    assert events == [("edit:fixed", msg.id), ("react:👍", msg.id), ("delete", msg.id)]


async def test_followups_ephemeral_and_edit_original(fake: FakeDiscord, world: World) -> None:
    client = Recorder()

    @client.tree.command(name="multi", description="Answers several times")
    async def multi(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("first")
        await interaction.followup.send("just for you", ephemeral=True)
        await interaction.edit_original_response(content="first (edited)")

    async with connected_client(client, fake):
        await client.tree.sync()
        assert [c["name"] for c in fake.commands()] == ["multi"]
        handle = await fake.invoke_command(world.general.id, world.alice, "multi")
        await fake.wait_for(
            lambda: handle.original and handle.original.content.endswith("(edited)")
        )
        followups = await handle.wait_followups(1)
        assert followups[0].content == "just for you" and followups[0].ephemeral
        channel_contents = [m.content for m in fake.channel_messages(world.general.id)]
        assert channel_contents == ["first (edited)"]  # the ephemeral one is not in the channel


async def test_late_interaction_response_is_unknown(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    failures: list[Exception] = []

    @client.tree.command(name="late", description="Too slow")
    async def late(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.3)
        try:
            await interaction.response.send_message("too late")
        except discord.NotFound as exc:
            failures.append(exc)

    async with connected_client(client, fake):
        await client.tree.sync()
        handle = await fake.invoke_command(
            world.general.id, world.alice, "late", respond_within=0.1
        )
        await fake.wait_for(lambda: failures)
    assert handle.expired and handle.response is None
    assert getattr(failures[0], "code", None) == 10062


async def test_context_menu_and_select(fake: FakeDiscord, world: World) -> None:
    client = Recorder()
    picked: list[str] = []

    class Picker(discord.ui.View):
        @discord.ui.select(
            custom_id="pick", options=[discord.SelectOption(label=x) for x in ("red", "blue")]
        )
        async def pick(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
            picked.extend(select.values)
            await interaction.response.edit_message(content=f"picked {select.values[0]}", view=None)

    @app_commands.context_menu(name="Quote")
    async def quote(interaction: discord.Interaction, message: discord.Message) -> None:
        await interaction.response.send_message(f"> {message.content}", view=Picker())

    client.tree.add_command(quote)
    async with connected_client(client, fake):
        await client.tree.sync()
        target = await fake.user_message(world.general.id, world.alice, "wise words")
        handle = await fake.invoke_context_menu(world.general.id, world.alice, "Quote", target)
        menu = await handle.wait_message()
        assert menu.content == "> wise words"
        choice = await fake.select_option(menu, "pick", ["blue"], world.alice)
        assert (await choice.wait_response()).type == 7
        assert picked == ["blue"]
        assert fake.get_message(menu.id).content == "picked blue"
        assert fake.get_message(menu.id).components == []


async def test_login_failures_surface() -> None:
    async with running_fake(privileged_intents=0) as fake:
        with pytest.raises(discord.LoginFailure):
            await start_client(Recorder(), fake, token="wrong")
        with pytest.raises(discord.PrivilegedIntentsRequired):
            await start_client(Recorder(), fake)


async def test_zstd_stream_when_available(fake: FakeDiscord) -> None:
    zstandard = pytest.importorskip("zstandard")
    async with aiohttp.ClientSession() as session:
        url = f"{fake.gateway_url}?v=10&encoding=json&compress=zstd-stream"
        async with session.ws_connect(url) as ws:
            decompress = zstandard.ZstdDecompressor().decompressobj()
            hello = json.loads(decompress.decompress(await ws.receive_bytes()))
    assert hello["op"] == 10
