"""One range per tunable setting: `.env` and `/admin settings set` accept exactly the same values.

Each tunable's range lives in `bot/settings.py` field metadata. The environment path
(`load_settings`) and the slash-command path (the real `/admin settings set` through the fake
Discord, which validates with `check_tunable`) are fed the same texts: each range's ends, just
outside them, and things that are not numbers of the right kind. Both must agree on every one,
and agree on the value an accepted text stands for.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from bot.settings import (
    TUNABLE,
    Settings,
    SettingsError,
    load_settings,
    settings_table,
    tunable_range,
)
from tests.bot_harness import ScriptedEngine, bot_settings, running_bot
from tests.fake_discord import running_fake

ROOT = Path(__file__).resolve().parents[1]
NOT_NUMBERS = ["warm", "nan", "inf", "-inf", "0x10", "1,5", "1e400"]


def is_int(name: str) -> bool:
    return Settings.__dataclass_fields__[name].type == "int"


def is_bool(name: str) -> bool:
    return Settings.__dataclass_fields__[name].type == "bool"


def is_text(name: str) -> bool:
    return Settings.__dataclass_fields__[name].type == "str"


def is_ids(name: str) -> bool:
    return Settings.__dataclass_fields__[name].type == "tuple[int, ...]"


#: A list of ids: accepted spellings, then texts that are not one.
IDS_IN = ["123,456", " 7 , 8 ", "9", "1,,2", "None"]
IDS_OUT = ["x", "1,x", "1.5", "@role"]


#: A switch's words: each accepted spelling, then texts that are not a switch.
SWITCH_IN = ["on", "off", "true", "false", "yes", "no", "1", "0", " ON "]
SWITCH_OUT = ["maybe", "2", "-1", "onn", "nan"]


def candidates(name: str) -> list[str]:
    """Texts on and around the edges of `name`'s range, and texts that are not its kind."""
    if is_bool(name):
        return SWITCH_IN + SWITCH_OUT
    if is_ids(name):
        return IDS_IN + IDS_OUT
    if is_text(name):  # text: its length is its range
        hi = int(tunable_range(name)[1])
        return ["hey, oi", "x" * hi, "x" * (hi + 1), " Quill "]
    lo, hi = tunable_range(name)
    step = 1 if is_int(name) else 0.01
    edges = [lo, hi, lo - step, hi + step, (lo + hi) / 2 if not is_int(name) else (lo + hi) // 2]
    texts = [f"{v:g}" if not is_int(name) else str(int(v)) for v in edges]
    texts += [f" {texts[0]} "]  # surrounding blanks are not part of the value
    if is_int(name):
        texts += [f"{int(lo) + 0.5}", f"{int(lo)}.0", "1e3"]
    else:
        texts += [f"{hi:g}e0", f"{hi + 1e-9!r}"]
    return texts + NOT_NUMBERS


def by_env(name: str, raw: str) -> float | int | None:
    """The value `.env` takes for `raw`, or None when it refuses it."""
    try:
        return getattr(load_settings({name.upper(): raw}, env_file=None), name)
    except SettingsError:
        return None


def test_the_tunables_are_the_settings_fields_marked_tunable() -> None:
    marked = [f.name for f in fields(Settings) if f.metadata["tunable"]]
    assert list(TUNABLE) == marked
    assert marked  # (each one's range is checked on both paths by the test below)


def test_readme_settings_table_is_generated_from_the_fields() -> None:
    assert settings_table() in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
async def test_env_and_admin_settings_set_accept_and_refuse_the_same_values(
    tmp_path: Path,
) -> None:
    async with running_fake(heartbeat_interval=1000) as fake:
        guild = fake.add_guild("Tuning")
        channel = fake.add_channel(guild.id, "general")
        admin = fake.add_member(guild.id, "admin", permissions=["manage_guild"]).user
        settings = bot_settings(tmp_path, "scripted")
        async with running_bot(fake, settings, engine=ScriptedEngine(["ok"])) as bot:
            (admin_cmd,) = [c for c in fake.commands() if c["name"] == "admin"]
            (group,) = [o for o in admin_cmd["options"] if o["name"] == "settings"]
            (set_cmd,) = [o for o in group["options"] if o["name"] == "set"]
            (name_opt,) = [o for o in set_cmd["options"] if o["name"] == "name"]
            assert [c["value"] for c in name_opt["choices"]] == list(TUNABLE)

            for name in TUNABLE:
                for raw in candidates(name):
                    env = by_env(name, raw)
                    handle = await fake.invoke_command(
                        channel.id,
                        admin,
                        "admin settings set",
                        {"name": name, "value": raw, "scope": "channel"},
                    )
                    text = (await handle.wait_message(10)).content  # the deferred answer
                    stored = (await bot.memory.places.channel(channel.id)).settings.get(name)
                    if env is None:
                        assert "Not changed" in text, (name, raw, text)
                    else:
                        assert f"`{name}` is now" in text, (name, raw, text)
                        if is_ids(name):  # kept as a JSON list, read back as the tuple
                            stored = tuple(stored)
                        assert stored == env and type(stored) is type(env), (name, raw, stored)
                    await bot.memory.places.update_channel(channel.id, guild.id, settings={})
                if is_bool(name):
                    assert [by_env(name, t) for t in SWITCH_IN] == [True, False] * 4 + [True]
                    assert [by_env(name, t) for t in SWITCH_OUT] == [None] * len(SWITCH_OUT)
                    continue
                if is_ids(name):
                    assert [by_env(name, t) for t in IDS_IN] == [(123, 456), (7, 8), (9,), (1, 2), ()]
                    assert [by_env(name, t) for t in IDS_OUT] == [None] * len(IDS_OUT)
                    continue
                if is_text(name):
                    hi = int(tunable_range(name)[1])
                    assert by_env(name, " Quill ") == "Quill" and by_env(name, "x" * hi)
                    assert by_env(name, "x" * (hi + 1)) is None
                    continue
                # the ends and the middle are in, just outside the ends and non-numbers out
                lo, hi, below, above, middle = candidates(name)[:5]
                assert None not in [by_env(name, t) for t in (lo, hi, middle)], name
                assert [by_env(name, t) for t in [below, above, *NOT_NUMBERS]] == [None] * 9
