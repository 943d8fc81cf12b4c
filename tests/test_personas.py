"""Personas: the shipped files, macros, lorebooks, and the persona prompt with the real tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from bot.cards import BookEntry, Card, CharacterBook, export_card
from bot.personas import (
    DEFAULT_PERSONA,
    DEFAULT_RP_SYSTEM,
    Persona,
    apply_macros,
    build_persona_prompt,
    imported_persona,
    load_builtin_personas,
    persona_system,
    personas_dir,
    select_lore,
    split_examples,
)
from bot.prompt import RESPONSE, Turn, clean_reply, other_speakers, stop_strings
from bot.prompt_window import TokenCounter

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama2-tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER / "tokenizer.model").is_file():
        pytest.skip(f"Llama 2 tokenizer fixture not found at {TOKENIZER}")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture()
def count(tokenizer) -> TokenCounter:
    return TokenCounter(lambda s: len(tokenizer(s, add_special_tokens=False).input_ids))


@pytest.fixture(scope="module")
def builtin():
    return load_builtin_personas()


def words(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------
# Shipped personas


def test_every_builtin_persona_loads_without_errors(builtin) -> None:
    table, errors = builtin
    assert errors == []
    assert {"hermes", "grumbold", "sable", "mira"} <= set(table)
    assert DEFAULT_PERSONA in table
    assert all(p.builtin and p.path is not None for p in table.values())


def test_roleplay_personas_are_complete(builtin) -> None:
    table, _ = builtin
    characters = [p for p in table.values() if p.name != DEFAULT_PERSONA]
    assert len(characters) >= 3
    for persona in characters:
        card = persona.card
        assert card.description and card.personality and card.scenario, persona.name
        assert card.first_mes and card.alternate_greetings, persona.name
        examples = split_examples(card.mes_example)
        assert len(examples) >= 2, persona.name
        assert all("{{char}}" in e and "{{user}}" in e for e in examples), persona.name
        assert card.tags and "sfw" in card.tags, persona.name
        assert isinstance(card.avatar, str) and Path(card.avatar).is_file(), persona.name
        with Image.open(card.avatar) as im:
            assert max(im.size) <= 512
    assert any(p.card.character_book and p.card.character_book.entries for p in characters)


def test_hermes_is_a_plain_assistant(builtin) -> None:
    hermes = builtin[0]["hermes"].card
    assert hermes.system_prompt.strip()
    assert not (hermes.description or hermes.personality or hermes.scenario or hermes.mes_example)


def test_names_are_looked_up_case_insensitively(builtin) -> None:
    table, _ = builtin
    assert table["GRUMBOLD"] is table["grumbold"] is table.get("Grumbold")
    assert "sAbLe" in table
    assert table.get("nobody") is None


def test_personas_dir_defaults_to_the_checkout_and_can_be_overridden(tmp_path: Path) -> None:
    assert personas_dir() == ROOT / "personas"
    assert (personas_dir() / "hermes.yaml").is_file()
    assert personas_dir("") == ROOT / "personas"  # settings' empty PERSONAS_DIR
    assert personas_dir(tmp_path) == tmp_path


def test_malformed_files_are_reported_by_name_and_skipped(tmp_path: Path) -> None:
    for name in ("sable.yaml", "sable.png"):
        shutil.copy(ROOT / "personas" / name, tmp_path / name)
    bad = {
        "broken.yaml": "name: [unclosed\n  - : :",
        "list.yaml": "- just\n- a list\n",
        "empty.yaml": "",
        "noname.yaml": "description: Nobody knows my name.\n",
        "types.yaml": "name: Typed\ntags: 5\n",
        "typo.yaml": "name: Typo\npersonallity: misspelt\n",
        "lore.yaml": "name: Lore\ncharacter_book:\n  entries:\n    - keys: [a]\n      position: middle\n",
        "dupe.yaml": "name: SABLE\n",
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    table, errors = load_builtin_personas(tmp_path)
    assert list(table) == ["sable"]
    assert len(errors) == len(bad)
    for name in bad:
        assert any(name in e for e in errors), name
    assert any("tags" in e for e in errors)
    assert any("personallity" in e for e in errors)


def test_missing_avatar_keeps_the_persona(tmp_path: Path) -> None:
    (tmp_path / "pic.yaml").write_text("name: Pic\navatar: nowhere.png\n", encoding="utf-8")
    (tmp_path / "url.yaml").write_text("name: Url\navatar: https://example.org/a.png\n")
    table, errors = load_builtin_personas(tmp_path)
    assert table["pic"].card.avatar is None
    assert table["url"].card.avatar == "https://example.org/a.png"
    assert len(errors) == 1 and "pic.yaml" in errors[0] and "nowhere.png" in errors[0]


def test_imported_persona_from_stored_card_json() -> None:
    card = Card(name="Guest", description="From a server.")
    persona = imported_persona(
        export_card(card).decode(), guild_id=1, creator_id=2, avatar=b"\x89PNG"
    )
    assert persona.card == card and persona.card.avatar == b"\x89PNG"
    assert (persona.guild_id, persona.creator_id, persona.builtin) == (1, 2, False)


# --------------------------------------------------------------------------------------------
# Macros


def test_macros_both_syntaxes_any_case() -> None:
    text = "{{char}} {{Char}} {{CHAR}} <BOT> <bot> | {{user}} {{USER}} { {user} } <USER> <User>"
    assert apply_macros(text, "Zia", "Alice") == (
        "Zia Zia Zia Zia Zia | Alice Alice { {user} } Alice Alice"
    )


def test_macros_do_not_expand_twice() -> None:
    assert apply_macros("{{char}} meets {{user}}", "{{user}}", "Bob") == "{{user}} meets Bob"
    assert apply_macros("{{user}}", "X", r"back\slash \1") == r"back\slash \1"


def test_greetings_have_macros_applied(builtin) -> None:
    greetings = builtin[0]["mira"].greetings("Captain Lee")
    assert len(greetings) == 3
    assert all("{{" not in g for g in greetings)
    assert "Captain Lee" in greetings[0]


# --------------------------------------------------------------------------------------------
# Lorebook


def entry(keys: list[str], content: str, **kw) -> BookEntry:
    return BookEntry(keys=keys, content=content, **kw)


def pick(entries: list[BookEntry], texts: list[str], **kw) -> list[str]:
    return [e.content for e in select_lore(CharacterBook(entries=entries), texts, words, **kw)]


def test_lore_key_match_is_whole_word_and_case_insensitive_by_default() -> None:
    dragon = entry(["dragon"], "Dragons hoard gold.")
    assert pick([dragon], ["A DRAGON lands!"]) == ["Dragons hoard gold."]
    assert pick([dragon], ["a dragonfly buzzes"]) == []


def test_lore_case_sensitive() -> None:
    e = entry(["Rex"], "Rex is the king.", case_sensitive=True)
    assert pick([e], ["rex is here"]) == []
    assert pick([e], ["Rex is here"]) == ["Rex is the king."]


def test_lore_selective_needs_a_secondary_key() -> None:
    e = entry(["sword"], "The sword is cursed.", selective=True, secondary_keys=["broken", "rust"])
    assert pick([e], ["I have a sword"]) == []
    assert pick([e], ["my sword is broken"]) == ["The sword is cursed."]
    assert pick([e], ["it's broken"]) == []  # a secondary key alone is not enough
    loose = entry(["sword"], "Swords.", selective=False, secondary_keys=["broken"])
    assert pick([loose], ["a sword"]) == ["Swords."]


def test_lore_constant_and_disabled() -> None:
    always = entry([], "The sky is green.", constant=True)
    off = entry(["moon"], "The moon is square.", enabled=False)
    off_const = entry([], "Never shown.", constant=True, enabled=False)
    assert pick([always, off, off_const], ["the moon rises"]) == ["The sky is green."]


def test_lore_scan_depth() -> None:
    e = entry(["lighthouse"], "The lighthouse is haunted.")
    recent = ["newest", "older", "the lighthouse, long ago"]  # newest first
    assert pick([e], recent, scan_depth=2) == []
    assert pick([e], recent, scan_depth=3) == ["The lighthouse is haunted."]
    book = CharacterBook(entries=[e], scan_depth=2)
    assert select_lore(book, recent, words) == []
    assert select_lore(CharacterBook(entries=[e]), recent, words) == [e]  # default: all


def test_lore_insertion_order_lower_first() -> None:
    entries = [
        entry(["x"], "thirty", insertion_order=30),
        entry(["x"], "ten", insertion_order=10),
        entry(["x"], "twenty", insertion_order=20),
    ]
    assert pick(entries, ["x"]) == ["ten", "twenty", "thirty"]


def test_lore_budget_drops_lowest_order_and_skips_what_does_not_fit() -> None:
    five = "one two three four five"
    entries = [
        entry(["x"], five, insertion_order=10),
        entry(["x"], five + " six", insertion_order=30),
        entry(["x"], five, insertion_order=20),
    ]
    # 6 + 5 fit in 12; the lowest order is the one left out
    assert [
        e.insertion_order
        for e in select_lore(CharacterBook(entries=entries), ["x"], words, budget=12)
    ] == [20, 30]
    # an entry too big is skipped, smaller lower-order ones still go in
    big = entry(["x"], "a b c d e f g h i j", insertion_order=99)
    small = entry(["x"], "tiny", insertion_order=1)
    assert pick([big, small], ["x"], budget=8) == ["tiny"]
    # the book's own token_budget applies when no budget is given
    book = CharacterBook(entries=entries, token_budget=6)
    assert [e.insertion_order for e in select_lore(book, ["x"], words)] == [30]


def test_lore_keys_are_not_regular_expressions() -> None:
    assert pick([entry(["a.c"], "dot")], ["abc"]) == []
    assert pick([entry(["a.c"], "dot")], ["see a.c here"]) == ["dot"]
    assert pick([entry(["(unclosed"], "paren")], ["x (unclosed y"]) == ["paren"]
    assert pick([entry(["C++"], "cpp")], ["I write C++ daily"]) == ["cpp"]


def test_lore_position_around_the_character() -> None:
    card = Card(name="Pos", description="DESCRIPTION")
    persona = Persona(card)
    lore = [
        entry(["k"], "AFTER-LORE", position="after_char"),
        entry(["k"], "BEFORE-LORE", position="before_char"),
    ]
    text = persona_system(persona, "Ann", lore=lore)
    assert text.index("BEFORE-LORE") < text.index("DESCRIPTION") < text.index("AFTER-LORE")


# --------------------------------------------------------------------------------------------
# The persona prompt (real Llama 2 tokenizer)

DRAGON_BOOK = CharacterBook(
    entries=[
        entry(["dragon"], "LORE-BEFORE: dragons nest on {{char}}'s roof.", position="before_char"),
        entry(["dragon"], "LORE-AFTER: {{user}} owes the dragon money.", position="after_char"),
        entry(["unicorn"], "LORE-UNUSED: unicorns.", position="after_char"),
    ]
)


def layout_persona(**changes) -> Persona:
    fields = dict(
        name="Wren",
        system_prompt="SYS-MARK {{original}}",
        description="DESC-MARK {{char}} is a wandering bard.",
        personality="PERS-MARK cheerful",
        scenario="SCEN-MARK {{user}} meets {{char}} at an inn.",
        mes_example=(
            "<START>\n{{user}}: EX-ONE hi\n{{char}}: hello\n"
            "<START>\n{{user}}: EX-TWO sing\n{{char}}: la la\n"
            "<START>\n{{user}}: EX-THREE bye\n{{char}}: farewell"
        ),
        post_history_instructions="POST-MARK keep {{char}} rhyming.",
        character_book=DRAGON_BOOK,
    )
    return Persona(Card(**(fields | changes)))


def history(n: int = 4) -> list[Turn]:
    """Newest first, alternating, every turn with a unique marker."""
    turns = []
    for i in range(n, 0, -1):
        if i % 2:
            turns.append(Turn("user", f"HIST-{i} tell me about the dragon", "Ann", id=i))
        else:
            turns.append(Turn("assistant", f"HIST-{i} a song of old", id=i))
    return turns


def current() -> Turn:
    return Turn("user", "CURRENT-MARK what now?", "Ann", id=100)


def test_persona_prompt_layout_order(count: TokenCounter) -> None:
    fitted = build_persona_prompt(layout_persona(), history(), current(), "Ann", count, 4096)
    text = fitted.text
    order = [
        "SYS-MARK",
        "You are Wren in an ongoing roleplay",  # {{original}} -> the default system prompt
        "LORE-BEFORE",
        "DESC-MARK",
        "Wren's personality: PERS-MARK",
        "Scenario: SCEN-MARK Ann meets Wren",
        "LORE-AFTER: Ann owes",
        "EX-ONE",
        "EX-TWO",
        "EX-THREE",
        "HIST-1",
        "HIST-4",
        "CURRENT-MARK",
        "POST-MARK keep Wren rhyming",
    ]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert text.startswith("### Input:\nSYS-MARK")
    assert text.endswith("### Input:\nPOST-MARK keep Wren rhyming.\n\n" + RESPONSE)
    assert text.count("### Input:") == 2  # one block for the whole system part, one post-history
    assert "LORE-UNUSED" not in text
    assert "{{" not in text and "<START>\nAnn: EX-ONE" in text
    assert "### Instruction:\nAnn: CURRENT-MARK" in text
    assert not fitted.dropped and len(fitted.turns) == 5
    assert all(t.name == "Wren" for t in fitted.turns if t.role == "assistant")


def test_hermes_prompt_has_no_roleplay_framing(builtin, count: TokenCounter) -> None:
    hermes = builtin[0]["Hermes"]
    fitted = build_persona_prompt(
        hermes, [], Turn("user", "What is 2+2?", "Ann"), "Ann", count, 4096
    )
    assert fitted.text == (
        "### Input:\nYou are Hermes, a helpful, witty assistant chatting in a Discord server. "
        "Answer the latest message.\n\n### Instruction:\nAnn: What is 2+2?\n\n" + RESPONSE
    )
    for framing in ("personality:", "Scenario:", "Example dialogue", "roleplay"):
        assert framing not in fitted.text


def test_examples_are_dropped_before_history(count: TokenCounter) -> None:
    def fit(persona: Persona, budget: int):
        return build_persona_prompt(persona, history(), current(), "Ann", count, budget)

    full = fit(layout_persona(), 4096)
    bare = fit(layout_persona(mes_example=""), 4096)
    one = fit(layout_persona(mes_example="<START>\n{{user}}: EX-ONE hi\n{{char}}: hello"), 4096)
    assert bare.tokens < one.tokens < full.tokens

    # room for the whole history but no examples: all examples go, no history does
    fitted = fit(layout_persona(), bare.tokens)
    assert not fitted.dropped and "HIST-4" in fitted.text and "HIST-1" in fitted.text
    assert "EX-ONE" not in fitted.text and "Example dialogue" not in fitted.text

    # room for one example: the last ones are dropped first
    fitted = fit(layout_persona(), one.tokens)
    assert not fitted.dropped and "HIST-4" in fitted.text
    assert "EX-ONE" in fitted.text and "EX-TWO" not in fitted.text and "EX-THREE" not in fitted.text

    # less than that: history must go too, and examples stay out
    fitted = fit(layout_persona(), bare.tokens - 20)
    assert fitted.dropped and "HIST-1" not in fitted.text and "EX-ONE" not in fitted.text


def test_budget_is_respected_by_the_real_tokenizer(builtin, tokenizer, count) -> None:
    grumbold = builtin[0]["grumbold"]
    turns = [
        Turn(
            "user" if i % 2 else "assistant",
            f"Message {i}: the anvil, Bessa and Emberdeep again, with quite a lot of words "
            "about hammers, tongs, bellows and the price of good coal.",
            "Ann" if i % 2 else "",
            id=i,
        )
        for i in range(300, 0, -1)
    ]
    for budget in (700, 1500, 3000):
        fitted = build_persona_prompt(grumbold, turns, current(), "Ann", count, budget)
        real = len(tokenizer(fitted.text).input_ids)  # with BOS, as the engine feeds it
        assert real <= budget, (budget, real, fitted.tokens)
        assert fitted.dropped and "Message 1:" not in fitted.text  # the oldest went
        assert "Message 300:" in fitted.text and "CURRENT-MARK" in fitted.text
        assert "Old Thunder is Grumbold's anvil" in fitted.text  # lore triggered by "anvil"
        assert fitted.text.endswith(RESPONSE)


def test_huge_definitions_are_cut_to_leave_room(count: TokenCounter, tokenizer) -> None:
    persona = Persona(Card(name="Verbose", description="blah " * 5000))
    fitted = build_persona_prompt(persona, history(), current(), "Ann", count, 1024)
    assert len(tokenizer(fitted.text).input_ids) <= 1024
    assert "CURRENT-MARK" in fitted.text and "HIST-4" in fitted.text


def test_default_system_is_used_without_a_card_system_prompt(count: TokenCounter) -> None:
    persona = layout_persona(system_prompt="")
    fitted = build_persona_prompt(persona, [], current(), "Ann", count, 4096)
    expected = apply_macros(DEFAULT_RP_SYSTEM, "Wren", "Ann")
    assert fitted.text.startswith(f"### Input:\n{expected}\n\n")
    custom = build_persona_prompt(
        persona, [], current(), "Ann", count, 4096, default_system="Plain {{char}}."
    )
    assert custom.text.startswith("### Input:\nPlain Wren.\n\n")


# --------------------------------------------------------------------------------------------
# Cutting the reply


def test_reply_is_cut_at_another_participants_line(builtin) -> None:
    grumbold = builtin[0]["grumbold"]
    people = ["Alice", "Grumbold", "Bob Smith", "alice"]
    # The bot's path: the one speaker rule (`other_speakers`), its stops and its cleaner.
    others = other_speakers(people, grumbold.name)
    assert others == ["Alice", "Bob Smith"]  # case-folded: "alice" is Alice, Grumbold is the bot
    assert other_speakers(["GRUMBOLD", "Ｇｒｕｍｂｏｌｄ", "Alice"], grumbold.name) == ["Alice"]

    def clean_persona_reply(text: str, persona: Persona, names: list[str]) -> str:
        return clean_reply(text, other_speakers(names, persona.name), persona.name)

    stops = stop_strings(others)
    assert "\nAlice:" in stops and "\nBob Smith:" in stops
    assert "\nGrumbold:" not in stops
    assert "### Instruction" in stops and "### Response" in stops

    raw = "Grumbold: *grunts* Three days, lad.\nAlice: Thank you!\nGrumbold: Hmph."
    assert clean_persona_reply(raw, grumbold, people) == "*grunts* Three days, lad."
    cut_at = min(raw.find(s) for s in stops if s in raw)
    assert raw[:cut_at] == "Grumbold: *grunts* Three days, lad."
    assert (
        clean_persona_reply("Fine.\n### Instruction:\nBob Smith: hi", grumbold, people) == "Fine."
    )


def test_all_builtin_prompts_fit(builtin, count: TokenCounter, tokenizer) -> None:
    for persona in builtin[0].values():
        fitted = build_persona_prompt(persona, history(), current(), "Ann", count, 2048)
        assert len(tokenizer(fitted.text).input_ids) <= 2048, persona.name
        assert "{{" not in fitted.text and "<user>" not in fitted.text.lower()
        assert fitted.text.count("### Input:") == 1 + bool(persona.card.post_history_instructions)
