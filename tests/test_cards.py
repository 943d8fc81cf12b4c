"""Character Card import/export: every card shape seen in the wild, and every way a file is bad."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from bot.card_files import (
    MAX_CARD_BYTES,
    MAX_TEXT_BYTES,
    PNG_SIGNATURE,
    export_png,
    iter_png_chunks,
    parse_card,
)
from bot.cards import BookEntry, Card, CardError, CharacterBook, card_to_dict, export_card

# --------------------------------------------------------------------------------------------
# Helpers: PNG files built the way card tools build them


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def plain_png(size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(out, "PNG")
    return out.getvalue()


def split_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """An independent chunk walker, so the tests do not trust the code under test."""
    assert png.startswith(PNG_SIGNATURE)
    pos, out = 8, []
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        out.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def join_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(chunk(t, b) for t, b in chunks)


def png_with(*extra: tuple[bytes, bytes], base: bytes | None = None) -> bytes:
    """`base` with `extra` chunks inserted after the image data, just before IEND."""
    chunks = split_chunks(base or plain_png())
    assert chunks[-1][0] == b"IEND"
    return join_chunks([*chunks[:-1], *extra, chunks[-1]])


def b64json(obj: object) -> bytes:
    return base64.b64encode(json.dumps(obj).encode("utf-8"))


def text_chunk(keyword: str, payload: bytes) -> tuple[bytes, bytes]:
    return b"tEXt", keyword.encode("latin-1") + b"\0" + payload


def v2(**data: object) -> dict:
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def full_card() -> Card:
    return Card(
        name="Tess Tinker",
        description="A gnome engineer.\nLoves {{user}}'s gadgets.",
        personality="curious, chatty",
        scenario="{{user}} visits the workshop.",
        first_mes="*Tess looks up.* Oh! Hello, {{user}}!",
        mes_example="<START>\n{{user}}: Hi\n{{char}}: Hello!",
        creator_notes="Not for the prompt.",
        system_prompt="{{original}} Be concise.",
        post_history_instructions="Stay in character.",
        alternate_greetings=["Hi again.", "Back so soon?"],
        character_book=CharacterBook(
            name="Workshop",
            scan_depth=3,
            token_budget=200,
            extensions={"vendor": {"depth": 4}},
            entries=[
                BookEntry(
                    keys=["gear", "cog"],
                    content="Gears are sacred.",
                    extensions={"probability": 100, "unknown_tool": [1, 2]},
                    insertion_order=7,
                    case_sensitive=True,
                    name="gears",
                    priority=3,
                    id=12,
                    comment="a comment",
                    selective=True,
                    secondary_keys=["oil"],
                    constant=False,
                    position="after_char",
                    extra={"sticky": 2},
                ),
                BookEntry(keys=["tea"], content="Tea time at four.", enabled=False),
            ],
            extra={"unknown_book_key": "kept"},
        ),
        tags=["gnome", "sfw"],
        creator="tester",
        character_version="1.2",
        extensions={"talkativeness": "0.5", "depth_prompt": {"depth": 4}, "x-other-tool": [1]},
        extra={"nickname": "Tess", "group_only_greetings": ["Hello, all!"]},
    )


def kind_of(data: bytes, filename: str | None = "card.png") -> tuple[str, str]:
    with pytest.raises(CardError) as err:
        parse_card(data, filename)
    return err.value.kind, str(err.value)


# --------------------------------------------------------------------------------------------
# Round trips


def test_export_then_import_is_identical_unknown_keys_included() -> None:
    card = full_card()
    again = parse_card(export_card(card), "tess.json")
    assert again == card
    assert again.extensions["x-other-tool"] == [1]
    assert again.extra == {"nickname": "Tess", "group_only_greetings": ["Hello, all!"]}
    assert again.character_book is not None
    assert again.character_book.entries[0].extra == {"sticky": 2}
    assert again.character_book.extra == {"unknown_book_key": "kept"}
    # compact export round-trips as well, and the spec envelope is V2
    assert parse_card(export_card(card, pretty=False)) == card
    assert json.loads(export_card(card))["spec"] == "chara_card_v2"
    assert json.loads(export_card(card))["spec_version"] == "2.0"


def test_export_omits_absent_optional_fields() -> None:
    card = Card(name="Min", character_book=CharacterBook(entries=[BookEntry(keys=["a"])]))
    data = card_to_dict(card)["data"]
    entry = data["character_book"]["entries"][0]
    assert set(entry) == {"keys", "content", "extensions", "enabled", "insertion_order"}
    assert "scan_depth" not in data["character_book"]
    assert parse_card(export_card(card)) == card


def test_export_png_round_trip_puts_chunk_after_image_data() -> None:
    card = full_card()
    png = export_png(card, plain_png())
    types = [t for t, _ in split_chunks(png)]
    assert types.index(b"tEXt") > types.index(b"IDAT")
    again = parse_card(png, "tess.png")
    assert again == card
    assert isinstance(again.avatar, bytes)
    # the stored avatar is the picture without the card text
    assert b"chara" not in again.avatar
    assert Image.open(io.BytesIO(again.avatar)).size == (8, 8)


def test_export_png_replaces_an_older_ccv3_chunk() -> None:
    old = png_with(text_chunk("ccv3", b64json(v2(name="Old"))))
    again = parse_card(export_png(Card(name="New"), old))
    assert again.name == "New"


def test_export_png_converts_other_image_formats() -> None:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, "JPEG")
    assert parse_card(export_png(Card(name="Jay"), out.getvalue())).name == "Jay"


# --------------------------------------------------------------------------------------------
# Shapes of cards


def test_png_chara_chunk_after_idat_imports() -> None:
    png = png_with(text_chunk("chara", b64json(v2(name="Pixel", description="From a PNG."))))
    types = [t for t, _ in split_chunks(png)]
    assert types.index(b"tEXt") > types.index(b"IDAT")  # really after the image data
    card = parse_card(png, "pixel.png")
    assert (card.name, card.description) == ("Pixel", "From a PNG.")


def test_ccv3_chunk_wins_over_chara() -> None:
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "Three", "assets": []}}
    ccv3 = text_chunk("ccv3", b64json(v3))
    chara = text_chunk("chara", b64json(v2(name="Two")))
    for chunks in ((ccv3, chara), (chara, ccv3)):  # whichever comes first in the file
        card = parse_card(png_with(*chunks))
        assert card.name == "Three"
        assert card.extra == {"assets": []}


def test_compressed_text_chunks_import() -> None:
    payload = b64json(v2(name="Zed"))
    ztxt = (b"zTXt", b"chara\0\0" + zlib.compress(payload))
    itxt = (b"iTXt", b"chara\0\x01\0en\0\0" + zlib.compress(payload))
    itxt_plain = (b"iTXt", b"chara\0\0\0\0\0" + payload)
    for extra in (ztxt, itxt, itxt_plain):
        assert parse_card(png_with(extra)).name == "Zed"


def test_v3_json_takes_data_fields() -> None:
    obj = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {"name": "V3", "tags": ["a"]}}
    card = parse_card(json.dumps(obj).encode())
    assert (card.name, card.tags) == ("V3", ["a"])


def test_v1_flat_card_imports() -> None:
    v1 = {
        "name": "Old Timer",
        "description": "desc",
        "personality": "pers",
        "scenario": "scen",
        "first_mes": "hello",
        "mes_example": "<START>\n{{char}}: hi",
    }
    card = parse_card(json.dumps(v1).encode(), "old.json")
    assert (card.name, card.description, card.personality) == ("Old Timer", "desc", "pers")
    assert (card.scenario, card.first_mes, card.mes_example) == (
        "scen",
        "hello",
        "<START>\n{{char}}: hi",
    )


def test_old_key_names_import() -> None:
    old = {
        "char_name": "Pyg",
        "char_persona": "A persona.",
        "world_scenario": "A world.",
        "char_greeting": "Greetings!",
        "example_dialogue": "<START>\nPyg: hi",
    }
    card = parse_card(json.dumps(old).encode())
    assert card.name == "Pyg"
    assert card.description == "A persona."
    assert card.scenario == "A world."
    assert card.first_mes == "Greetings!"
    assert card.mes_example == "<START>\nPyg: hi"
    assert card.extra == {}  # old keys are mapped, not carried as unknown


def test_crlf_is_normalised_everywhere() -> None:
    obj = v2(
        name="Crlf",
        description="one\r\ntwo\rthree",
        mes_example="<START>\r\n{{user}}: hi\r\n",
        alternate_greetings=["a\r\nb"],
        character_book={"entries": [{"keys": ["k"], "content": "x\r\ny"}]},
    )
    card = parse_card(json.dumps(obj).encode())
    assert card.description == "one\ntwo\nthree"
    assert card.mes_example == "<START>\n{{user}}: hi\n"
    assert card.alternate_greetings == ["a\nb"]
    assert card.character_book is not None
    assert card.character_book.entries[0].content == "x\ny"


def test_lenient_import_of_messy_real_world_fields() -> None:
    obj = v2(
        name="  Messy \n Name ",
        tags="fantasy, elf",
        character_version=2.1,
        alternate_greetings=None,
        extensions=None,
        character_book={"entries": [{"keys": "one", "content": "c", "insertion_order": "3"}]},
    )
    card = parse_card(json.dumps(obj).encode())
    assert card.name == "Messy Name"
    assert card.tags == ["fantasy", "elf"]
    assert card.character_version == "2.1"
    assert card.alternate_greetings == [] and card.extensions == {}
    assert card.character_book is not None
    entry = card.character_book.entries[0]
    assert (entry.keys, entry.insertion_order) == (["one"], 3)
    assert parse_card(export_card(card)) == card  # what we coerced exports canonically


def test_json_with_bom_imports() -> None:
    assert parse_card(b"\xef\xbb\xbf" + json.dumps(v2(name="Bom")).encode()).name == "Bom"


# --------------------------------------------------------------------------------------------
# Bad files: one class, one message


def bomb_png() -> bytes:
    chunks = split_chunks(plain_png())
    ihdr = struct.pack(">II", 100_000, 100_000) + chunks[0][1][8:]
    return join_chunks(
        [(b"IHDR", ihdr), *chunks[1:-1], text_chunk("chara", b64json(v2(name="B"))), chunks[-1]]
    )


def zip_bomb_png() -> bytes:
    bomb = zlib.compress(b"A" * (MAX_TEXT_BYTES + 1024), 9)
    assert len(bomb) < 100_000  # small on disk, huge once inflated
    return png_with((b"zTXt", b"chara\0\0" + bomb))


BAD_FILES = {
    "format": lambda: b"GIF89a not a card at all",
    "no_chunk": lambda: png_with(text_chunk("Comment", b"just a picture")),
    "base64": lambda: png_with(text_chunk("chara", b"@@@ not base64 @@@")),
    "json": lambda: b'{"name": "Broken", "description": }',
    "too_big": lambda: b"{" + b" " * MAX_CARD_BYTES + b"}",
    "bomb": bomb_png,
    "no_name": lambda: json.dumps(v2(name="   ", description="nameless")).encode(),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_each_bad_file_class_is_reported(kind: str) -> None:
    got, message = kind_of(BAD_FILES[kind]())
    assert got == kind
    assert "card.png" in message  # the user is told which upload is wrong


def test_bad_file_messages_are_all_different() -> None:
    messages = {kind: kind_of(make())[1] for kind, make in BAD_FILES.items()}
    assert len(set(messages.values())) == len(BAD_FILES)
    assert "2 MB" in messages["too_big"]
    assert "base64" in messages["base64"]
    assert "JSON" in messages["json"]
    assert "decompression bomb" in messages["bomb"]
    assert "name" in messages["no_name"]
    assert "no character card data" in messages["no_chunk"]
    assert "not a character card" in messages["format"]


def test_zip_bomb_text_chunk_is_refused() -> None:
    kind, message = kind_of(zip_bomb_png())
    assert kind == "bomb"
    assert "expands past" in message


def test_size_is_checked_before_parsing() -> None:
    # garbage that would fail every other check still reports the size first
    assert kind_of(b"\x00" * (MAX_CARD_BYTES + 1))[0] == "too_big"
    assert kind_of(PNG_SIGNATURE + b"\xff" * MAX_CARD_BYTES)[0] == "too_big"


def test_missing_name_and_invalid_json_in_a_png() -> None:
    assert kind_of(png_with(text_chunk("chara", b64json(v2(description="x")))))[0] == "no_name"
    bad = base64.b64encode(b"{not json")
    assert kind_of(png_with(text_chunk("chara", bad)))[0] == "json"


def test_truncated_png_is_damaged_not_a_crash() -> None:
    png = png_with(text_chunk("chara", b64json(v2(name="T"))))
    kind, message = kind_of(png[:-40])
    assert kind == "damaged"
    assert "damaged PNG" in message


def test_chunk_walker_rejects_lengths_past_the_end() -> None:
    liar = PNG_SIGNATURE + struct.pack(">I4s", 1 << 30, b"IHDR") + b"\0" * 20
    with pytest.raises(CardError) as err:
        list(iter_png_chunks(liar))
    assert err.value.kind == "damaged"


def test_deeply_nested_json_is_invalid_not_a_crash() -> None:
    assert kind_of(b"[" * 200_000 + b"]" * 200_000)[0] == "json"


def test_json_array_is_not_a_card() -> None:
    kind, message = kind_of(b'["name"]', None)
    assert kind == "json"
    assert message.startswith("The file")
