"""`/persona` through the protocol-level fake Discord: choosing, importing, creating and sharing
characters, and the characters speaking for themselves through the bot's webhooks."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.card_files import export_png, parse_card
from bot.personas import fill, load_builtin_personas
from tests.bot_harness import ScriptedEngine, bot_settings, running_bot
from tests.fake_discord import (
    PATIENCE,
    FakeDiscord,
    FakeFile,
    FakeMessage,
    FakeUser,
    FakeWebhook,
    InteractionHandle,
)
from tests.world import World

pytestmark = pytest.mark.slow

BUILTINS, _ = load_builtin_personas()
GRUMBOLD = BUILTINS["Grumbold"]
SABLE = BUILTINS["Sable"]

#: A Card V2 with things other tools put there: unknown `data` keys, extensions, a lorebook.
NOVA: dict[str, Any] = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Nova",
        "description": "{{char}} is the starship Meridian's AI and loves bad space puns.",
        "personality": "curious, cheerful",
        "scenario": "{{user}} wakes up from cryosleep.",
        "first_mes": "Good morning, {{user}}! Systems nominal, coffee not.",
        "mes_example": "<START>\n{{user}}: Status?\n{{char}}: Stellar, as always.",
        "creator_notes": "",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": ["Welcome back, {{user}}."],
        "character_book": {
            "name": "Meridian",
            "extensions": {"world_tool": {"id": 7}},
            "entries": [
                {
                    "keys": ["engine"],
                    "content": "The engine hums in B flat.",
                    "extensions": {"depth": 4},
                    "enabled": True,
                    "insertion_order": 1,
                    "x_entry_extra": "kept",
                }
            ],
        },
        "tags": ["scifi"],
        "creator": "someone else",
        "character_version": "2.1",
        "extensions": {"talkativeness": "0.5", "other_tool": {"nested": [1, {"deep": True}]}},
        "x_unknown_field": {"kept": True},
    },
}


def card_json(**changes: Any) -> bytes:
    card = json.loads(json.dumps(NOVA))
    card["data"].update(changes)
    return json.dumps(card).encode()


def small_png(color: tuple[int, int, int] = (200, 30, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, "PNG")
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# The world and small helpers


async def command(
    w: World, name: str, options: dict[str, Any] | None = None, *, user: FakeUser | None = None,
    channel: int | None = None,
) -> InteractionHandle:  # fmt: skip
    return await w.fake.invoke_command(channel or w.general.id, user or w.alice, name, options)


async def said(handle: InteractionHandle, timeout: float = PATIENCE) -> str:
    """The text a command answered with, whether at once or after a "thinking" defer."""
    response = await handle.wait_response(timeout)
    assert response.type in (4, 5), f"answered with callback type {response.type}"
    if response.type == 4:
        return response.content or ""
    return (await handle.wait_message(timeout)).content


def hooks(fake: FakeDiscord, channel_id: int | None = None) -> list[FakeWebhook]:
    return [h for h in fake.webhooks.values() if channel_id is None or h.channel_id == channel_id]


def hook_messages(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    """What personas posted through webhooks in a channel (threads are their own channel)."""
    return [
        m
        for m in fake.channel_messages(channel_id)
        if m.webhook_id is not None and m.interaction_metadata is None
    ]


def bot_messages(fake: FakeDiscord, channel_id: int) -> list[FakeMessage]:
    """Messages from the bot's own account, interaction answers left out."""
    return [
        m
        for m in fake.channel_messages(channel_id)
        if m.author.id == fake.bot_user.id and m.interaction_metadata is None
    ]


async def mention(w: World, text: str, *, channel: int | None = None, user: FakeUser | None = None):
    return await w.fake.user_message(
        channel or w.general.id, user or w.alice, f"{w.fake.bot_user.mention} {text}"
    )


async def settled(w: World, bot: Any, count: int, channel: int | None = None) -> list[FakeMessage]:
    """Wait until `count` persona/bot messages are in the channel and no reply is pending."""
    channel = channel or w.general.id

    def posted() -> list[FakeMessage]:
        return hook_messages(w.fake, channel) + bot_messages(w.fake, channel)

    await w.fake.wait_for(lambda: len(posted()) >= count and bot.conv.pending == 0)
    return sorted(posted(), key=lambda m: m.id)


def webhook_sends(fake: FakeDiscord, hook: FakeWebhook) -> list:
    return fake.find_requests("POST", f"/webhooks/{hook.id}/{re.escape(hook.token)}")


def modal_inputs(handle: InteractionHandle) -> dict[str, dict[str, Any]]:
    """The text inputs of the modal a command answered with, by label."""
    assert handle.response is not None and handle.response.type == 9, handle.response
    found: dict[str, dict[str, Any]] = {}

    def walk(component: dict[str, Any], label: str | None) -> None:
        if component.get("type") == 4:
            found[component.get("label") or label or component["custom_id"]] = component
        for child in component.get("components") or []:
            walk(child, component.get("label"))
        if "component" in component:
            walk(component["component"], component.get("label"))

    for component in handle.response.data["components"]:
        walk(component, None)
    return found


async def submit(
    w: World, handle: InteractionHandle, user: FakeUser | None = None, **by_label: str
):
    """Fill the modal by label (Name, Description, ...) and submit it; other inputs keep
    their prefilled values. Returns the submission's text answer."""
    await handle.wait_response()
    inputs = modal_inputs(handle)
    values = {c["custom_id"]: c.get("value") or "" for c in inputs.values()}
    for label, value in by_label.items():
        values[inputs[label.replace("_", " ").capitalize()]["custom_id"]] = value
    done = await w.fake.submit_modal(handle, values, user)
    return await said(done)


# --------------------------------------------------------------------------------------------
# Speaking as the persona


async def test_use_greets_through_a_webhook_and_changes_the_prompt(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    engine = ScriptedEngine(["*Grumbold grunts.* Aye.", "*He squints.* Again?"])
    settings = bot_settings(tmp_path, "scripted")
    async with running_bot(fake, settings, engine=engine) as bot:
        answer = await said(await command(world, "persona use", {"name": "grumbold"}))
        assert answer == "**Grumbold** is now playing in this channel."
        assert (await bot.memory.places.channel(world.general.id)).persona == "Grumbold"

        # one webhook, owned by the bot, made in this channel
        (hook,) = hooks(fake)
        assert hook.channel_id == world.general.id and hook.creator.id == fake.bot_user.id
        assert len(fake.find_requests("POST", f"/channels/{world.general.id}/webhooks")) == 1
        # the built-in's avatar is a PNG file: it became the webhook's own picture
        faces = fake.find_requests("PATCH", rf"/webhooks/{hook.id}(/[^/]+)?")
        assert faces and faces[-1].json["avatar"].startswith("data:image/png;base64,")
        assert hook.avatar is not None

        greeting = fill(GRUMBOLD.card.first_mes, "Grumbold", "alice")
        (posted,) = hook_messages(fake, world.general.id)
        assert posted.content == greeting and posted.username == "Grumbold"
        assert posted.author.avatar == hook.avatar  # shown with Grumbold's face
        (send,) = webhook_sends(fake, hook)
        assert send.query.get("wait") in ("1", "true") and send.json["username"] == "Grumbold"
        assert send.json["allowed_mentions"]["parse"] == []

        (turn,) = await bot.memory.turns.history(world.general.id)
        assert (turn.role, turn.persona, turn.name) == ("assistant", "Grumbold", "Grumbold")
        assert turn.content == greeting
        assert await bot.memory.turns.message_ids(turn.id) == [posted.id]

        # the next prompt is Grumbold's, with his greeting as his first Response
        await mention(world, "Can you mend a kettle?")
        first, reply = await settled(world, bot, 2)
        prompt = engine.prompts[-1]
        assert GRUMBOLD.card.description.splitlines()[0] in prompt
        assert "Grumbold's personality:" in prompt
        assert f"### Response:\n{greeting}\n\n" in prompt
        assert prompt.endswith("alice: Can you mend a kettle?\n\n### Input:\n"
                               "Keep Grumbold gruff and brief; his kindness shows in what he "
                               "does, never in what he admits.\n\n### Response:\n")  # fmt: skip
        assert "You are Hermes" not in prompt
        assert reply.webhook_id == hook.id and reply.username == "Grumbold"
        assert reply.content == "*Grumbold grunts.* Aye."

        # a second reply reuses the webhook
        await mention(world, "Please?")
        await settled(world, bot, 3)
        assert len(hooks(fake)) == 1 and len(webhook_sends(fake, hook)) == 3
        turns = await bot.memory.turns.history(world.general.id)
        assert [(t.role, t.persona) for t in turns if t.role == "assistant"] == [
            ("assistant", "Grumbold")
        ] * 3

    # after a restart the webhook comes from the database: none is made again
    engine2 = ScriptedEngine(["*Hammering.* Still here."])
    async with running_bot(fake, settings, engine=engine2) as bot:
        await mention(world, "Still open?")
        *_, last = await settled(world, bot, 4)
        assert last.content == "*Hammering.* Still here." and last.webhook_id == hook.id
        assert len(fake.find_requests("POST", r"/channels/\d+/webhooks")) == 1
        assert len(hooks(fake)) == 1
        assert f"### Response:\n{greeting}\n\n" in engine2.prompts[-1]


async def test_url_avatar_streaming_edits_and_threads(world: World, tmp_path: Path) -> None:
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "vela.yaml").write_text(
        "name: Vela\n"
        "description: Vela is a lighthouse keeper who speaks in weather reports.\n"
        "first_mes: 'Fog at dawn, {{user}}. Visibility: you.'\n"
        "avatar: https://example.com/vela.png\n",
        encoding="utf-8",
    )
    fake = world.fake
    text = "Storm warning for the outer banks. " * 12
    engine = ScriptedEngine([text, "Clear skies in the thread."], delay=0.02, piece=25)
    settings = bot_settings(tmp_path, "scripted", PERSONAS_DIR=str(folder), STREAM_INTERVAL="0.05")
    async with running_bot(fake, settings, engine=engine) as bot:
        assert "Vela" in await said(await command(world, "persona use", {"name": "Vela"}))
        (hook,) = hooks(fake)
        (greeting,) = hook_messages(fake, world.general.id)
        assert greeting.content == "Fog at dawn, alice. Visibility: you."
        assert (greeting.username, greeting.avatar_url) == ("Vela", "https://example.com/vela.png")
        assert hook.avatar is None  # a URL face travels with each message; the webhook keeps none

        await mention(world, "Forecast?")
        _, reply = await settled(world, bot, 2)
        assert reply.content == text.strip()
        assert (reply.username, reply.avatar_url) == ("Vela", "https://example.com/vela.png")
        sends = webhook_sends(fake, hook)
        assert all(s.json["avatar_url"] == "https://example.com/vela.png" for s in sends)
        assert all(s.json["username"] == "Vela" for s in sends)
        # the stream grew by editing the webhook's message, pinging nobody
        edits = fake.find_requests(
            "PATCH", f"/webhooks/{hook.id}/{re.escape(hook.token)}/messages/{reply.id}"
        )
        assert edits and reply.history
        assert all(e.json["allowed_mentions"]["parse"] == [] for e in edits)
        assert not fake.find_requests("PATCH", f"/channels/{world.general.id}/messages/.*")

        # a thread speaks through its parent's webhook
        thread = fake.add_thread(world.general.id, "side quest")
        await command(world, "persona use", {"name": "Vela"}, channel=thread.id)
        await fake.wait_for(lambda: hook_messages(fake, thread.id))
        await mention(world, "And here?", channel=thread.id)
        posted = await settled(world, bot, 2, channel=thread.id)
        assert [m.webhook_id for m in posted] == [hook.id, hook.id]
        assert posted[-1].content == "Clear skies in the thread."
        assert len(hooks(fake)) == 1
        assert all(
            s.query.get("thread_id") == str(thread.id) for s in webhook_sends(fake, hook)[-2:]
        )

        # /persona show uses the URL as the thumbnail
        shown = await command(world, "persona show", {"name": "Vela"})
        response = await shown.wait_message()  # the deferred answer
        assert response.embeds[0]["thumbnail"]["url"] == "https://example.com/vela.png"
        assert not response.attachments


async def test_fallback_to_bold_names_without_webhooks_and_in_dms(
    world: World, tiny_model: Path, tmp_path: Path
) -> None:
    fake = world.fake
    locked = fake.add_channel(world.guild.id, "locked")
    fake.deny_bot_permissions(locked.id, "manage_webhooks")
    async with running_bot(fake, bot_settings(tmp_path, tiny_model)) as bot:
        await said(await command(world, "persona use", {"name": "Sable"}, channel=locked.id))
        greeting = fill(SABLE.card.first_mes, "Sable", "alice")
        (posted,) = bot_messages(fake, locked.id)
        assert posted.content == f"**Sable:** {greeting}" and posted.webhook_id is None
        await mention(world, "I lost my sock.", channel=locked.id)
        _, reply = await settled(world, bot, 2, channel=locked.id)
        assert reply.author.id == fake.bot_user.id and reply.content.startswith("**Sable:** ")
        assert not hooks(fake)
        turns = await bot.memory.turns.history(locked.id)
        assert turns[0].content == greeting  # stored without the bold name
        assert all(t.persona == "Sable" for t in turns if t.role == "assistant")

        dm = fake.dm_channel(world.alice)
        answer = await said(
            await command(world, "persona use", {"name": "Grumbold"}, channel=dm.id)
        )
        assert "Grumbold" in answer
        (hello,) = bot_messages(fake, dm.id)
        assert (
            hello.content == f"**Grumbold:** {fill(GRUMBOLD.card.first_mes, 'Grumbold', 'alice')}"
        )
        await fake.user_message(dm.id, world.alice, "Got any work?")
        _, reply = await settled(world, bot, 2, channel=dm.id)
        assert reply.content.startswith("**Grumbold:** ")
        assert not hooks(fake)


async def test_own_webhook_posts_are_not_triggers_but_persona_turns(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    engine = ScriptedEngine(["The name's Sable.", "Still here.", "Case closed."])
    async with running_bot(fake, bot_settings(tmp_path, "scripted"), engine=engine) as bot:
        await bot.memory.places.update_channel(world.general.id, world.guild.id, mode="always")
        await said(await command(world, "persona use", {"name": "Sable"}))
        await fake.user_message(world.general.id, world.bob, "Who are you?")
        await settled(world, bot, 2)
        # the webhook posts' MESSAGE_CREATEs were dispatched before bob's next message: once
        # that is answered, the bot has seen them (a channel's messages are taken in order)
        await fake.user_message(world.general.id, world.bob, "Anything else?")
        await settled(world, bot, 3)
        assert len(engine.prompts) == 2  # only bob's messages were answered: no loop
        assert fake.dispatched and all(
            m.author.id != fake.bot_user.id for m in hook_messages(fake, world.general.id)
        )
        turns = await bot.memory.turns.history(world.general.id)
        assert [(t.role, t.name, t.persona) for t in turns] == [
            ("assistant", "Sable", "Sable"),
            ("user", "bob", None),
            ("assistant", "Sable", "Sable"),
            ("user", "bob", None),
            ("assistant", "Sable", "Sable"),
        ]
        webhook_ids = [m.id for m in hook_messages(fake, world.general.id)]
        assert [
            await bot.memory.turns.message_ids(t.id) for t in turns if t.role == "assistant"
        ] == [[i] for i in webhook_ids]

        # in mention mode, replying to the persona's message addresses the bot
        await bot.memory.places.update_channel(world.general.id, world.guild.id, mode="mention")
        await fake.user_message(
            world.general.id, world.alice, "Any leads?", reply_to=webhook_ids[-1]
        )
        posted = await settled(world, bot, 4)
        assert posted[-1].content == "Case closed." and len(engine.prompts) == 3
        assert "bob: Who are you?" in engine.prompts[-1]
        assert "### Response:\nThe name's Sable.\n\n" in engine.prompts[-1]


async def test_server_default_persona_speaks_with_its_face(world: World, tmp_path: Path) -> None:
    fake = world.fake
    owner = fake.users[world.guild.owner_id]
    engine = ScriptedEngine(["*Clang.*"])
    async with running_bot(fake, bot_settings(tmp_path, "scripted"), engine=engine) as bot:
        text = await said(
            await command(world, "admin persona default", {"name": "Grumbold"}, user=owner)
        )
        assert "Grumbold" in text
        await mention(world, "Hello?")
        (reply,) = await settled(world, bot, 1)
        (hook,) = hooks(fake)
        assert reply.webhook_id == hook.id and reply.username == "Grumbold"
        assert hook.avatar is not None and reply.author.avatar == hook.avatar


async def test_deleted_webhook_is_replaced_and_refused_names_fall_back(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    settings = bot_settings(tmp_path, "scripted")
    async with running_bot(fake, settings, engine=ScriptedEngine(["Hm."])):
        await said(await command(world, "persona use", {"name": "Grumbold"}))
        (first,) = hooks(fake)
    fake.delete_webhook(first.id)  # someone removed it while the bot was away
    async with running_bot(fake, settings, engine=ScriptedEngine(["Back."])) as bot:
        await mention(world, "Open?")
        *_, reply = await settled(world, bot, 2)
        (second,) = hooks(fake)
        assert reply.content == "Back." and reply.webhook_id == second.id != first.id
        assert await bot.memory.webhooks.get(world.general.id) == (second.id, second.token)

        fake.delete_webhook(second.id)  # ...and again while it runs
        text = await said(await command(world, "persona use", {"name": "Sable"}))
        assert text == "**Sable** is now playing in this channel."
        (third,) = hooks(fake)
        refused = [r for r in webhook_sends(fake, second) if r.status == 404]
        assert len(refused) == 1  # the greeting was tried on the old webhook, then the new one
        greeting = hook_messages(fake, world.general.id)[-1]
        assert greeting.webhook_id == third.id and greeting.username == "Sable"
        assert (await bot.memory.turns.history(world.general.id))[-1].persona == "Sable"

        # Discord refuses webhook names containing "clyde": that persona speaks as the bot
        crab = FakeFile("crab.json", card_json(name="Clyde the Crab", first_mes="Snip!"))
        await said(await command(world, "persona import", {"card": crab}))
        await said(await command(world, "persona use", {"name": "Clyde the Crab"}))
        (snip,) = bot_messages(fake, world.general.id)
        assert snip.content == "**Clyde the Crab:** Snip!"
        executed = fake.find_requests("POST", r"/webhooks/\d+/[^/]+")
        assert not [r for r in executed if (r.json or {}).get("username") == "Clyde the Crab"]


# --------------------------------------------------------------------------------------------
# Import, create, edit, delete, export


async def test_import_json_and_png_cards(world: World, tmp_path: Path) -> None:
    fake = world.fake
    png_card = parse_card(card_json(name="Pixel", first_mes="Beep, {{user}}."))
    image = small_png()
    png = export_png(png_card, image)
    assert png.index(b"IDAT") < png.index(b"tEXtchara")  # the card after the image data
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])) as bot:
        text = await said(
            await command(world, "persona import", {"card": FakeFile("nova.json", card_json())})
        )
        assert "Saved **Nova**" in text
        stored = await bot.memory.personas.get(world.guild.id, "nova")
        assert stored is not None and stored.created_by == world.alice.id
        assert parse_card(stored.card.encode()) == parse_card(card_json())
        assert stored.avatar is None

        text = await said(
            await command(
                world, "persona import", {"card": FakeFile("pixel.png", png, "image/png")},
                user=world.bob,
            )
        )  # fmt: skip
        assert "Saved **Pixel**" in text
        pixel = await bot.memory.personas.get(world.guild.id, "Pixel")
        assert pixel is not None and pixel.created_by == world.bob.id
        assert pixel.avatar is not None and pixel.avatar.startswith(b"\x89PNG")
        assert b"chara" not in pixel.avatar  # the picture is kept without the card text
        assert parse_card(pixel.card.encode()) == png_card
        log = await bot.memory.audit.latest(world.guild.id)
        assert [(r.action, r.user_id, r.new) for r in log[:2]] == [
            ("persona.import", world.bob.id, "Pixel"),
            ("persona.import", world.alice.id, "Nova"),
        ]

        # the PNG's image is the persona's face
        await said(await command(world, "persona use", {"name": "Pixel"}))
        (hook,) = hooks(fake)
        (greeting,) = hook_messages(fake, world.general.id)
        assert greeting.content == "Beep, alice." and greeting.username == "Pixel"
        assert hook.avatar is not None and greeting.author.avatar == hook.avatar

        # importing the same name again is refused, the first stays
        again = await said(
            await command(world, "persona import", {"card": FakeFile("n.json", card_json())},
                          user=world.bob)
        )  # fmt: skip
        assert "already has **Nova**" in again
        assert (await bot.memory.personas.get(world.guild.id, "Nova")).created_by == world.alice.id
        clash = await said(
            await command(world, "persona import", {"card": FakeFile("g.json", card_json(name="Grumbold"))})
        )  # fmt: skip
        assert "built-in" in clash


@pytest.mark.parametrize(
    ("filename", "data", "expected"),
    [
        ("notes.txt", b"just some text", "not a character card"),
        ("broken.json", b'{"spec": "chara_card_v2", "data": {"name": ', "does not contain valid card JSON"),
        ("huge.json", b"{" + b" " * (2 * 1024 * 1024) + b"}", "at most 2 MB"),
        ("anonymous.json", json.dumps({"spec": "chara_card_v2", "data": {"description": "x"}}).encode(), "no character name"),
        ("photo.png", small_png(), "carries no character card data"),
    ],
    ids=["not-a-card", "invalid-json", "too-big", "no-name", "plain-png"],
)  # fmt: skip
async def test_bad_import_is_explained_and_nothing_stored(
    world: World, tmp_path: Path, filename: str, data: bytes, expected: str
) -> None:
    async with running_bot(
        world.fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])
    ) as bot:
        text = await said(
            await command(world, "persona import", {"card": FakeFile(filename, data)})
        )
        assert text.startswith("Not imported:") and expected in text, text
        assert await bot.memory.personas.in_guild(world.guild.id) == []
        assert not [
            r for r in await bot.memory.audit.latest(world.guild.id) if r.action == "persona.import"
        ]


async def test_imports_can_be_limited_to_managers(world: World, tmp_path: Path) -> None:
    fake = world.fake
    owner = fake.users[world.guild.owner_id]
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])) as bot:
        await said(await command(world, "admin persona imports", {"rule": "deny"}, user=owner))
        assert (await bot.memory.places.guild(world.guild.id)).imports_allowed is False
        card = FakeFile("nova.json", card_json())
        denied = await said(await command(world, "persona import", {"card": card}, user=world.bob))
        assert "Manage Server" in denied
        denied = await command(world, "persona create", user=world.bob)
        assert "Manage Server" in await said(denied)
        assert await bot.memory.personas.in_guild(world.guild.id) == []
        allowed = await said(
            await command(world, "persona import", {"card": card}, user=world.admin)
        )
        assert "Saved **Nova**" in allowed
        (stored,) = await bot.memory.personas.in_guild(world.guild.id)
        assert stored.created_by == world.admin.id


async def test_create_edit_delete_and_who_may(world: World, tmp_path: Path) -> None:
    fake = world.fake
    engine = ScriptedEngine(["Ahoy."])
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        # first Grumbold sets the channel's webhook face...
        await said(await command(world, "persona use", {"name": "Grumbold"}))
        creating = await command(world, "persona create")
        text = await submit(
            world, creating, Name="  Captain   Brine ", Description="{{char}} is a salty pirate.",
            Personality="loud", Scenario="On deck.", First_message="Arr, {{user}}!",
        )  # fmt: skip
        assert "Saved **Captain Brine**" in text
        stored = await bot.memory.personas.get(world.guild.id, "Captain Brine")
        assert stored is not None and stored.created_by == world.alice.id
        card = parse_card(stored.card.encode())
        assert (card.description, card.personality, card.first_mes) == (
            "{{char}} is a salty pirate.", "loud", "Arr, {{user}}!"
        )  # fmt: skip

        # ...and a persona without a picture does not borrow Grumbold's
        await said(await command(world, "persona use", {"name": "captain brine"}))
        (hook,) = hooks(fake)
        brine = hook_messages(fake, world.general.id)[-1]
        assert brine.content == "Arr, alice!" and brine.username == "Captain Brine"
        assert brine.author.avatar is None

        # bob is neither the creator nor a manager: edit and delete are refused
        before = await bot.memory.personas.get(world.guild.id, "Captain Brine")
        refused = await said(
            await command(world, "persona edit", {"name": "Captain Brine"}, user=world.bob)
        )
        assert "Only <@" in refused and "Manage Server" in refused
        refused = await said(
            await command(world, "persona delete", {"name": "Captain Brine"}, user=world.bob)
        )
        assert "Only <@" in refused
        assert await bot.memory.personas.get(world.guild.id, "Captain Brine") == before
        builtin = await said(await command(world, "persona edit", {"name": "Grumbold"}))
        assert "built in" in builtin

        # the creator edits: the modal comes prefilled, the next prompt uses the new text
        editing = await command(world, "persona edit", {"name": "Captain Brine"})
        await editing.wait_response()
        inputs = modal_inputs(editing)
        assert inputs["Name"]["value"] == "Captain Brine"
        assert inputs["First message"]["value"] == "Arr, {{user}}!"
        text = await submit(world, editing, Description="{{char}} is a retired pirate who knits.")
        assert "Saved **Captain Brine**" in text
        edited = await bot.memory.personas.get(world.guild.id, "Captain Brine")
        assert edited is not None and edited.created_by == world.alice.id
        assert (
            parse_card(edited.card.encode()).description
            == "{{char}} is a retired pirate who knits."
        )
        await mention(world, "What are you making?")
        await settled(world, bot, 3)
        assert "Captain Brine is a retired pirate who knits." in engine.prompts[-1]

        # a rename onto a built-in's or another persona's name loses nothing
        await said(
            await command(
                world, "persona import", {"card": FakeFile("n.json", card_json())}, user=world.bob
            )
        )
        for taken in ("Sable", "Nova"):
            editing = await command(world, "persona edit", {"name": "Captain Brine"})
            text = await submit(world, editing, Name=taken)
            assert text.startswith("Not saved"), text
        names = sorted(p.name for p in await bot.memory.personas.in_guild(world.guild.id))
        assert names == ["Captain Brine", "Nova"]
        nova = await bot.memory.personas.get(world.guild.id, "Nova")
        assert nova.created_by == world.bob.id and parse_card(nova.card.encode()) == parse_card(
            card_json()
        )

        # a manager renames someone else's persona: it stays its creator's
        editing = await command(world, "persona edit", {"name": "Nova"}, user=world.admin)
        assert "Saved **Nova Prime**" in await submit(
            world, editing, world.admin, Name="Nova Prime"
        )
        renamed = await bot.memory.personas.get(world.guild.id, "Nova Prime")
        assert renamed is not None and renamed.created_by == world.bob.id
        assert await bot.memory.personas.get(world.guild.id, "Nova") is None
        kept = parse_card(renamed.card.encode())
        assert kept.extensions == NOVA["data"]["extensions"] and kept.character_book is not None

        # a card too long for Discord's form is not offered in one
        long = FakeFile("epic.json", card_json(name="Epic", first_mes="Once upon a time. " * 300))
        await said(await command(world, "persona import", {"card": long}))
        text = await said(await command(world, "persona edit", {"name": "Epic"}))
        assert "too long" in text and "first_mes" in text

        # a manager may delete it
        text = await said(
            await command(world, "persona delete", {"name": "Captain Brine"}, user=world.admin)
        )
        assert text == "Deleted **Captain Brine**."
        assert await bot.memory.personas.get(world.guild.id, "Captain Brine") is None
        log = await bot.memory.audit.latest(world.guild.id)
        assert (log[0].action, log[0].user_id, log[0].old) == (
            "persona.delete",
            world.admin.id,
            "Captain Brine",
        )
        gone = await said(await command(world, "persona show", {"name": "Captain Brine"}))
        assert "no persona called" in gone


async def test_export_is_a_card_v2_that_reimports_identically(world: World, tmp_path: Path) -> None:
    fake = world.fake
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])) as bot:
        await said(
            await command(world, "persona import", {"card": FakeFile("nova.json", card_json())})
        )
        exporting = await command(world, "persona export", {"name": "nova"})
        response = await exporting.wait_message()  # the deferred answer
        assert "Character Card V2" in response.content and response.ephemeral
        (file,) = response.attachments
        assert file.filename == "Nova.json"
        exported = json.loads(file.data)
        assert exported["spec"] == "chara_card_v2" and exported["spec_version"] == "2.0"
        assert exported["data"]["x_unknown_field"] == {"kept": True}
        assert exported["data"]["extensions"] == NOVA["data"]["extensions"]
        entry = exported["data"]["character_book"]["entries"][0]
        assert entry["x_entry_extra"] == "kept" and entry["extensions"] == {"depth": 4}
        assert parse_card(file.data) == parse_card(card_json())

        # delete it and import the exported file: the same card again
        await said(await command(world, "persona delete", {"name": "Nova"}))
        await said(
            await command(world, "persona import", {"card": FakeFile("Nova.json", file.data)})
        )
        stored = await bot.memory.personas.get(world.guild.id, "Nova")
        assert stored is not None and parse_card(stored.card.encode()) == parse_card(card_json())
        again = await command(world, "persona export", {"name": "Nova"})
        assert (await again.wait_message()).attachments[0].data == file.data

        # built-ins export too
        grumbold = await command(world, "persona export", {"name": "Grumbold"})
        (file,) = (await grumbold.wait_message()).attachments
        assert parse_card(file.data) == GRUMBOLD.card


async def test_list_show_and_autocomplete(world: World, tmp_path: Path) -> None:
    fake = world.fake
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])):
        await said(
            await command(world, "persona import", {"card": FakeFile("nova.json", card_json())})
        )
        listing = await command(world, "persona list")
        text = await said(listing)
        assert listing.response.ephemeral
        assert "**Built-in:** Grumbold, Hermes, MIRA, Sable" in text
        assert "**This server:** Nova" in text and "In this channel: **Hermes**" in text
        await said(await command(world, "persona use", {"name": "Nova"}))
        assert "In this channel: **Nova**" in await said(await command(world, "persona list"))

        shown = await command(world, "persona show", {"name": "grumbold"})
        response = await shown.wait_message()  # the deferred answer
        (embed,) = response.embeds
        assert embed["title"] == "Grumbold" and "dwarven blacksmith" in embed["description"]
        assert embed["thumbnail"]["url"] == "attachment://avatar.png"
        (avatar,) = response.attachments
        assert avatar.filename == "avatar.png"
        assert avatar.data == Path(GRUMBOLD.card.avatar).read_bytes()  # type: ignore[arg-type]
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert "grumpy" in fields["Personality"] and "you has walked" in fields["Scenario"]

        nova = await (await command(world, "persona show", {"name": "Nova"})).wait_message()
        assert (
            nova.embeds[0]["description"]
            == "Nova is the starship Meridian's AI and loves bad space puns."
        )
        fields = {f["name"]: f["value"] for f in nova.embeds[0]["fields"]}
        assert fields["Added by"] == f"<@{world.alice.id}>"  # a field: footers show no mentions
        missing = await said(await command(world, "persona show", {"name": "Nobody"}))
        assert "no persona called 'Nobody'" in missing

        choices = await fake.autocomplete(
            world.general.id, world.bob, "persona use", {"name": "o"}, "name"
        )
        assert [c["value"] for c in choices] == ["Grumbold", "Nova"]
        choices = await fake.autocomplete(
            world.general.id, world.bob, "persona show", {"name": ""}, "name"
        )
        assert [c["name"] for c in choices] == ["Grumbold", "Hermes", "MIRA", "Sable", "Nova"]
        choices = await fake.autocomplete(
            world.general.id, world.bob, "persona export", {"name": "SAB"}, "name"
        )
        assert [c["value"] for c in choices] == ["Sable"]


async def test_off_returns_to_the_plain_hermes_prompt(world: World, tmp_path: Path) -> None:
    fake = world.fake
    engine = ScriptedEngine(["*Tail flick.*", "Happy to help!"])
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await said(await command(world, "persona use", {"name": "Sable"}))
        await mention(world, "Who took my sock?")
        await settled(world, bot, 2)
        assert "Sable is a black cat private eye" in engine.prompts[-1]
        text = await said(await command(world, "persona off"))
        assert text == "Back to the default persona in this channel."
        assert (await bot.memory.places.channel(world.general.id)).persona is None
        await mention(world, "What is 2 + 2?")
        *_, reply = await settled(world, bot, 3)
        prompt = engine.prompts[-1]
        assert prompt.startswith(f"### Input:\n{bot.settings.system_prompt}\n\n")
        assert "black cat private eye" not in prompt and "Sable's personality" not in prompt
        assert reply.author.id == fake.bot_user.id and reply.webhook_id is None
        assert reply.content == "Happy to help!"
        log = await bot.memory.audit.latest(world.guild.id)
        assert (log[0].action, log[0].old, log[0].new) == ("persona.off", "Sable", None)


async def test_malformed_persona_file_is_reported_and_skipped(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "good.yaml").write_text(
        "name: Wren\ndescription: Wren is a cheerful courier.\nfirst_mes: Package for you!\n",
        encoding="utf-8",
    )
    (folder / "broken.yaml").write_text("name: [Oops\ndescription: unclosed\n", encoding="utf-8")
    (folder / "nameless.yaml").write_text("description: nobody\n", encoding="utf-8")
    settings = bot_settings(tmp_path, "x", PERSONAS_DIR=str(folder))
    caplog.set_level(logging.WARNING, logger="bot.discord.client")
    async with running_bot(world.fake, settings, engine=ScriptedEngine(["Signed, sealed."])) as bot:
        skipped = [r.getMessage() for r in caplog.records if "persona skipped" in r.getMessage()]
        assert any("'broken.yaml'" in m and "invalid YAML" in m for m in skipped), skipped
        assert any("'nameless.yaml'" in m for m in skipped), skipped
        assert list(bot.personas.builtins) == ["wren"]
        text = await said(await command(world, "persona list"))
        assert "**Built-in:** Wren" in text
        await said(await command(world, "persona use", {"name": "Wren"}))
        await mention(world, "Anything for me?")
        posted = await settled(world, bot, 2)
        assert [m.content for m in posted] == ["Package for you!", "Signed, sealed."]


async def test_blocked_member_cannot_make_a_persona_speak(world: World, tmp_path: Path) -> None:
    async with running_bot(
        world.fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["hi"])
    ) as bot:
        await bot.memory.places.set_blocked(world.guild.id, "user", world.bob.id, True)
        text = await said(await command(world, "persona use", {"name": "Grumbold"}, user=world.bob))
        assert "can't use my commands" in text
        assert (await bot.memory.places.channel(world.general.id)).persona is None
        assert not hook_messages(world.fake, world.general.id)
        assert await bot.memory.turns.history(world.general.id) == []


async def test_reply_recovers_when_the_webhook_is_deleted_while_running(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    engine = ScriptedEngine(["Hm.", "Still here."])
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await said(await command(world, "persona use", {"name": "Grumbold"}))
        (first,) = hooks(fake)
        fake.delete_webhook(first.id)
        await mention(world, "Are you open?")
        *_, reply = await settled(world, bot, 2)
        (second,) = hooks(fake)
        assert reply.content == "Hm." and reply.webhook_id == second.id != first.id
        assert reply.username == "Grumbold"
        assert await bot.memory.webhooks.get(world.general.id) == (second.id, second.token)
        assert (await bot.memory.turns.history(world.general.id))[-1].content == "Hm."


async def test_thread_takes_its_parents_persona_and_settings(world: World, tmp_path: Path) -> None:
    fake = world.fake
    engine = ScriptedEngine(["In the thread."])
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=engine) as bot:
        await said(await command(world, "persona use", {"name": "Sable"}))
        chan = await bot.memory.places.channel(world.general.id)
        await bot.memory.places.update_channel(
            world.general.id, world.guild.id, settings={**chan.settings, "temperature": 0.25}
        )
        thread = fake.add_thread(world.general.id, "case file")
        await mention(world, "Who did it?", channel=thread.id)
        (reply,) = await settled(world, bot, 1, channel=thread.id)
        assert reply.username == "Sable" and reply.content == "In the thread."
        assert "Sable" in engine.prompts[-1] and engine.params[-1].temperature == 0.25
        # the thread keeps its own memory
        assert [t.content for t in await bot.memory.turns.history(thread.id)] == [
            "Who did it?",
            "In the thread.",
        ]


async def test_export_as_png_puts_the_card_in_the_personas_picture(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    image = small_png((10, 200, 40))
    card = parse_card(card_json(name="Pixel", first_mes="Beep."))
    async with running_bot(fake, bot_settings(tmp_path, "x"), engine=ScriptedEngine(["ok"])):
        png = export_png(card, image)
        await said(await command(world, "persona import", {"card": FakeFile("p.png", png)}))
        exporting = await command(world, "persona export", {"name": "Pixel", "format": "png"})
        response = await exporting.wait_message()  # the deferred answer
        assert "Character Card V2 PNG" in response.content
        (file,) = response.attachments
        assert file.filename == "Pixel.png" and file.data.startswith(b"\x89PNG")
        assert parse_card(file.data, "Pixel.png") == card  # SillyTavern reads the same card
        with Image.open(io.BytesIO(file.data)) as im:  # and it is still the persona's picture
            assert im.size == (8, 8) and im.convert("RGB").getpixel((0, 0)) == (10, 200, 40)

        # a persona without a picture of its own still gets its card, as JSON, and is told so
        await said(
            await command(world, "persona import", {"card": FakeFile("n.json", card_json())})
        )
        plain = await (
            await command(world, "persona export", {"name": "Nova", "format": "png"})
        ).wait_message()
        assert "no picture" in plain.content
        (file,) = plain.attachments
        assert file.filename == "Nova.json" and parse_card(file.data) == parse_card(card_json())
