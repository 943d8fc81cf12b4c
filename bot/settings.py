"""All settings, read in one place: the environment, then a `.env` file, then defaults.

One frozen `Settings` object is built at start and passed to whatever needs it; nothing else
reads the environment. Each field's metadata carries its environment key, accepted values and
help text, which also generate `.env.example` and the README's table (`python -m bot
settings-table`), so the docs cannot drift from the code. The generation settings marked
`tunable` may be overridden per server or channel; `check_tunable` validates those overrides
with the same parser and range as the environment, so `.env` and `/admin settings set` accept
exactly the same values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dotenv import dotenv_values


class SettingsError(ValueError):
    """A bad setting: the message is one line naming the key and what it accepts."""


def _opt(
    default: Any,
    help: str,
    choices: tuple[str, ...] = (),
    lo: float | None = None,
    hi: float | None = None,
    secret: bool = False,
    tunable: bool = False,
) -> Any:
    """A field with its help text and accepted values; `tunable`: admins may override it per
    server or channel (`/admin settings set`), within the same range."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "lo": lo,
            "hi": hi,
            "secret": secret,
            "tunable": tunable,
        },
    )


@dataclass(frozen=True)
class Settings:
    discord_token: str = _opt(
        "", "Bot token from the Discord developer portal (Bot → Reset Token).", secret=True
    )
    model: str = _opt(
        "NousResearch/Nous-Hermes-llama-2-7b",
        "Hugging Face hub id, local folder or .gguf file of a Llama-family Alpaca model.",
    )
    tokenizer: str = _opt(
        "",
        "Tokenizer folder, .gguf file or hub id, when it differs from MODEL (with "
        "ENGINE=openai only the tokenizer is needed locally).",
    )
    prompt_format: str = _opt(
        "auto",
        "How prompts are laid out: auto uses the tokenizer's chat template when it has one "
        "(ChatML, Llama-3, Mistral ...) and Alpaca otherwise (Nous-Hermes-Llama2); chat_template "
        "requires one; server sends role messages to the OpenAI-compatible chat endpoint "
        "(ENGINE=openai) and lets the server apply its template.",
        choices=("auto", "alpaca", "chat_template", "server"),
    )
    engine: str = _opt(
        "auto",
        "Where generation runs: local (transformers), llamacpp (a .gguf file on llama.cpp, the "
        "`llamacpp` extra), openai (an OpenAI-compatible server: vLLM, llama.cpp, Ollama), or "
        "auto: llamacpp for a .gguf MODEL on a machine without CUDA, otherwise local.",
        choices=("auto", "local", "llamacpp", "openai"),
    )
    openai_base_url: str = _opt(
        "http://127.0.0.1:8000/v1", "Base URL of the OpenAI-compatible server (ENGINE=openai)."
    )
    openai_api_key: str = _opt("", "API key for that server; may be empty.", secret=True)
    openai_model: str = _opt("", "Model name on that server; defaults to MODEL.")
    quantization: str = _opt(
        "none",
        "Load the local model quantised with bitsandbytes (the `quant` extra): on CUDA, and on the "
        "CPU through its CPU backend; 4bit is NF4 with double quantization computing in DTYPE.",
        choices=("none", "8bit", "4bit"),
    )
    dtype: str = _opt(
        "auto",
        "Weights dtype: auto picks bfloat16 (float16 before Ampere) on CUDA; on the CPU bfloat16 "
        "where it has native bf16 (AVX-512 BF16 or AMX, asked of torch) and float32 elsewhere "
        "(8bit stays float32). The startup log and doctor say which and why.",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    device_map: str = _opt(
        "auto", "transformers device_map: auto (all GPUs, then CPU), cpu, cuda, cuda:N, or none."
    )
    db_path: Path = _opt(
        Path("data/hermes.db"), "SQLite file for memory and settings; parent folders are created."
    )
    context_tokens: int = _opt(
        4096, "Prompt + reply window in tokens (Llama 2: 4096).", lo=256, hi=131072, tunable=True
    )
    max_new_tokens: int = _opt(400, "Longest reply in tokens.", lo=1, hi=8192, tunable=True)
    temperature: float = _opt(
        0.7, "Sampling temperature; 0 is greedy.", lo=0.0, hi=5.0, tunable=True
    )
    top_p: float = _opt(0.9, "Nucleus sampling mass.", lo=0.0, hi=1.0, tunable=True)
    top_k: int = _opt(40, "Top-k sampling; 0 disables.", lo=0, hi=1000, tunable=True)
    repetition_penalty: float = _opt(
        1.1, "Penalty for repeated tokens; 1 disables.", lo=0.5, hi=3.0, tunable=True
    )
    system_prompt: str = _opt(
        "You are Hermes, a helpful, witty assistant chatting in a Discord "
        "server. Answer the latest message.",
        "Default system text (an Input block) when no persona is set.",
    )
    template_system_prompt: str = _opt(
        "",
        "System text under a chat template while SYSTEM_PROMPT keeps its default (a small chat "
        "model takes the witty default too literally); empty: the template's own default "
        "system message (SmolLM2's 'You are a helpful AI assistant named SmolLM ...').",
    )
    owner_ids: tuple[int, ...] = _opt(
        (), "Comma-separated Discord user ids with admin rights everywhere."
    )
    log_level: str = _opt(
        "INFO", "Logging level.", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    dev_guild_id: int = _opt(
        0, "Sync slash commands to this server only (instant); 0 syncs globally.", lo=0
    )
    allow_dms: bool = _opt(True, "Answer direct messages.")
    stream_interval: float = _opt(
        1.2, "Seconds between streaming edits of a reply, per channel.", lo=0.0, hi=60.0
    )
    queue_size: int = _opt(
        64, "Pending replies before users are told the bot is busy.", lo=1, hi=100000
    )
    user_cooldown: float = _opt(
        2.0, "Seconds a user must wait between triggering replies.", lo=0.0, hi=3600.0
    )
    reply_timeout: float = _opt(
        180.0, "Seconds before a generation is abandoned with an apology.", lo=1.0, hi=3600.0
    )
    catchup_minutes: float = _opt(
        30.0,
        "On start and after a new gateway session, read back this many minutes of each served "
        "channel's history: store what was missed and answer what was addressed to the bot "
        "(also replies still owed when it stopped); 0 disables.",
        lo=0.0,
        hi=1440.0,
    )
    catchup_messages: int = _opt(
        100, "Most messages catch-up reads back per channel (the newest ones).", lo=0, hi=1000
    )
    max_batch: int = _opt(
        8, "Concurrent sequences the local engine decodes together.", lo=1, hi=256
    )
    threads: int = _opt(0, "CPU threads of the llamacpp engine; 0 uses every core.", lo=0, hi=1024)
    n_gpu_layers: int = _opt(
        0,
        "Layers the llamacpp engine offloads to the GPU (a CUDA/Metal build of llama.cpp); "
        "-1 offloads all.",
        lo=-1,
        hi=100000,
    )
    kv_cache_mb: int = _opt(
        2048,
        "KV-cache budget (MB) of the local engine: running sequences plus idle channels' cached "
        "prompts (0: no cap, no prompt cache). A 4096-token Llama-2-7B window is ~2 GB in fp16; "
        "raise it on a GPU (see docs/serving.md).",
        lo=0,
        hi=1 << 20,
    )
    fit_slack: float = _opt(
        0.25,
        "When the window overflows, drop this share of the oldest "
        "history at once, so the cached prefix stays stable.",
        lo=0.0,
        hi=0.9,
    )
    recall: bool = _opt(
        True,
        "Long-term recall: when the history does not fit the window, search the channel's older "
        "turns (SQLite FTS5) for the new message and show the best hits to the model.",
        tunable=True,
    )
    recall_tokens: int = _opt(
        0,
        "Tokens of the window given to recalled turns (taken from the history); 0 is 10% of "
        "CONTEXT_TOKENS.",
        lo=0,
        hi=32768,
    )
    attachment_kb: int = _opt(
        64,
        "Text attachments (message.txt pastes, code files) up to this many KB per message are "
        "read into the conversation; larger or binary ones are only named. 0 reads none.",
        lo=0,
        hi=1024,
    )
    vision: bool = _opt(
        False,
        "Send image attachments (PNG, JPEG, WebP, GIF) to the model as image parts of the "
        "member's message, for a vision model: needs ENGINE=openai with PROMPT_FORMAT=server "
        "(the chat endpoint carries images); otherwise images are only named.",
    )
    image_kb: int = _opt(
        2048,
        "Largest image (KB) VISION sends to the model; larger ones are only named.",
        lo=1,
        hi=20480,
    )
    personas_dir: Path = _opt(
        Path(""), "Folder of persona YAML files; empty uses the shipped personas/."
    )
    shard_count: int = _opt(
        0,
        "Gateway shards (discord.py AutoShardedBot); 0 takes Discord's recommendation, which is "
        "1 below 2,500 servers.",
        lo=0,
        hi=4096,
    )
    metrics_port: int = _opt(
        0, "Serve Prometheus metrics on this port; 0 disables.", lo=0, hi=65535
    )
    scene_max: int = _opt(
        4, "Most personas one channel's scene may hold (`/persona scene add`).", lo=1, hi=25
    )
    scene_chain: int = _opt(
        1,
        "Most replies scene personas make to each other per human message (0: they only "
        "answer people).",
        lo=0,
        hi=10,
    )
    confirm_timeout: float = _opt(
        60.0,
        "Seconds a confirmation button (`/admin memory clear`) waits for its click; then it "
        "times out and nothing changes.",
        lo=1.0,
        hi=3600.0,
    )
    wake_words: bool = _opt(
        False,
        "In `mention` channels, also answer messages that name the bot, its persona or a scene "
        "member as a word (and any WAKE_EXTRA word).",
        tunable=True,
    )
    wake_extra: str = _opt(
        "",
        "Extra comma-separated wake words for WAKE_WORDS (at most 200 characters).",
        hi=200,
        tunable=True,
    )
    notes_tokens: int = _opt(
        256,
        "Tokens of the window given to a channel's notes (`/note add`), which are always in the "
        "prompt; notes past it are left out, the newest first.",
        lo=0,
        hi=8192,
    )
    summary_after: int = _opt(
        40,
        "Write a channel's rolling summary in the background once this many of its turns have "
        "scrolled out of the window unsummarised (it is shown before recall); 0 disables.",
        lo=0,
        hi=100000,
        tunable=True,
    )
    summary_tokens: int = _opt(
        256, "Longest rolling summary in tokens (written and shown).", lo=16, hi=4096
    )
    member_cards_tokens: int = _opt(
        256,
        "Tokens of the window given to the cards (`/me describe`) of the members speaking in "
        "it, the latest speakers first.",
        lo=0,
        hi=8192,
    )
    authors_note: str = _opt(
        "",
        "Author's note: text inserted AUTHORS_NOTE_DEPTH turns before the end of the prompt "
        "(at most 1000 characters); set it per channel.",
        hi=1000,
        tunable=True,
    )
    authors_note_depth: int = _opt(
        4,
        "How many turns before the end the author's note goes (0: after the whole history).",
        lo=0,
        hi=100,
        tunable=True,
    )

    ooc_prefixes: str = _opt(
        "((,//,OOC:",
        "Comma-separated prefixes of out-of-character lines (any case): such a message is stored "
        "hidden from the bot and not answered; none turns this off (at most 100 characters).",
        hi=100,
        tunable=True,
    )
    allowed_roles: tuple[int, ...] = _opt(
        (),
        "Comma-separated role ids: only members with one of these roles may talk to the bot "
        "(the others are ignored, their messages not stored); empty (or none) lets everyone.",
        tunable=True,
    )

    allow_bots: tuple[int, ...] = _opt(
        (),
        "Comma-separated user ids of other bots (or webhooks) the bot talks to as it does to "
        "members; empty (or none): it ignores every bot. Its own posts and persona webhooks "
        "are never answered.",
        tunable=True,
    )
    bot_chain: int = _opt(
        3,
        "Most replies the bot gives to ALLOW_BOTS bots in a channel per human message there, so "
        "two bots cannot answer each other forever (0: it stores what they say, never answers).",
        lo=0,
        hi=50,
    )

    idle_minutes: int = _opt(
        0,
        "Unprompted replies: after human talk, this many minutes of silence give the bot one "
        "chance (IDLE_CHANCE) to speak by itself; 0 (the default) never.",
        lo=0,
        hi=10080,
        tunable=True,
    )
    idle_chance: float = _opt(
        0.5,
        "The probability that a channel's chance for an unprompted reply is taken.",
        lo=0.0,
        hi=1.0,
        tunable=True,
    )
    idle_per_hour: int = _opt(1, "Most unprompted replies per channel in any hour.", lo=0, hi=60)
    idle_per_day: int = _opt(4, "Most unprompted replies per channel in any day.", lo=0, hi=1440)
    idle_quiet_from: int = _opt(
        0,
        "Quiet hours for unprompted replies start at this UTC hour (0-23); equal to "
        "IDLE_QUIET_TO: no quiet hours.",
        lo=0,
        hi=23,
        tunable=True,
    )
    idle_quiet_to: int = _opt(
        0,
        "Quiet hours end at this UTC hour (not included; they may wrap midnight: 22 to 7).",
        lo=0,
        hi=23,
        tunable=True,
    )

    def system_text(self, templated: bool) -> str:
        """The plain assistant's system text: SYSTEM_PROMPT, or, in a chat template while
        SYSTEM_PROMPT is left at its default, TEMPLATE_SYSTEM_PROMPT."""
        default = type(self).__dataclass_fields__["system_prompt"].default
        if templated and self.system_prompt == default:
            return self.template_system_prompt
        return self.system_prompt

    def redacted(self) -> dict[str, Any]:
        """Settings safe to print: secrets show only whether they are set."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.upper()] = ("set" if value else "not set") if f.metadata["secret"] else value
        return out

    def as_written(self) -> dict[str, str]:
        """`redacted()` in `.env` spelling, for `doctor`: what a user would write for each key."""
        return {key: written(value) for key, value in self.redacted().items()}


_KINDS = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "tuple[int, ...]": "comma-separated numeric ids",
}


class _WrongKind(ValueError):
    """The text is not a value of the field's type."""


class _OutOfRange(ValueError):
    """A value of the right type outside the field's range (NaN included)."""


def _parse(f: Any, raw: str) -> Any:
    """The value `raw` (already stripped) stands for; the one place a field's range is checked."""
    typ = f.type
    try:
        if typ == "int":
            value = int(raw)
        elif typ == "float":
            value = float(raw)
        elif typ == "bool":
            lowered = raw.lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("1", "true", "yes", "on")
        elif typ == "Path":
            return Path(raw).expanduser()
        elif typ == "tuple[int, ...]":  # "none" empties it where an empty text can't be given
            if raw.lower() == "none":
                return ()
            return tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
        else:
            value = raw
    except ValueError:
        raise _WrongKind from None
    if isinstance(value, str):  # text: `hi` is its longest length
        if f.metadata["hi"] is not None and len(value) > f.metadata["hi"]:
            raise _OutOfRange
        return value
    lo, hi = f.metadata["lo"], f.metadata["hi"]
    # `value != value` is NaN, which no range comparison would catch
    if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _OutOfRange
    return value


def _convert(key: str, raw: str, f: Any) -> Any:
    meta = f.metadata
    raw = raw.strip()
    if meta["choices"]:
        value = raw.upper() if key == "LOG_LEVEL" else raw.lower()
        if value not in meta["choices"]:
            raise SettingsError(
                f"{key}={raw!r} is not valid; use one of: {', '.join(meta['choices'])}"
            )
        return value
    try:
        return _parse(f, raw)
    except _WrongKind:
        raise SettingsError(f"{key}={raw!r} is not valid; expected {_KINDS[f.type]}") from None
    except _OutOfRange:
        lo, hi = meta["lo"], meta["hi"]
        allowed = (
            f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"{lo} to {hi}"
        )
        raise SettingsError(f"{key}={raw!r} is out of range; allowed {allowed}") from None


_FIELDS = {f.name: f for f in fields(Settings)}

#: Generation settings an admin may override per server or channel (`tunable=True` fields).
TUNABLE: tuple[str, ...] = tuple(f.name for f in fields(Settings) if f.metadata["tunable"])


def tunable_range(name: str) -> tuple[float, float]:
    """The lowest and highest value `name` accepts, from `.env` and `/admin settings set` alike."""
    meta = _FIELDS[name].metadata
    return meta["lo"], meta["hi"]


def tunable_label(name: str) -> str:
    """What `name` accepts, as `/admin settings set` offers it: `0–5`, `on/off`, or text up to
    a length."""
    f = _FIELDS[name]
    if f.type == "bool":
        return "on/off"
    if f.type == "tuple[int, ...]":
        return "ids, comma-separated"
    lo, hi = tunable_range(name)
    if f.type == "str":
        return f"text, up to {hi:g} characters" if hi is not None else "text"
    return f"{lo:g}–{hi:g}"


def check_tunable(name: str, raw: str) -> float | int | bool | str:
    """Parse and range-check an admin-supplied value; ValueError names the allowed range.

    The same parser and range as `.env` (`load_settings`), with the message worded for Discord.
    """
    if name not in TUNABLE:
        raise ValueError(f"unknown setting {name!r}; choose one of {', '.join(TUNABLE)}")
    f = _FIELDS[name]
    lo, hi = tunable_range(name)
    try:
        return _parse(f, raw.strip())
    except _WrongKind:
        if f.type == "bool":
            raise ValueError(f"{name} must be on or off (got {raw})") from None
        if f.type == "tuple[int, ...]":
            raise ValueError(f"{name} must be {_KINDS[f.type]} (got {raw})") from None
        raise ValueError(f"{name} must be {_KINDS[f.type]} from {lo:g} to {hi:g}") from None
    except _OutOfRange:
        if f.type == "str":
            raise ValueError(f"{name} must be at most {hi} characters") from None
        raise ValueError(f"{name} must be between {lo:g} and {hi:g} (got {raw})") from None


def load_settings(
    env: Mapping[str, str] | None = None, env_file: str | Path | None = ".env", **overrides: Any
) -> Settings:
    """Build Settings from the environment over a `.env` file; raises SettingsError.

    The process environment wins over `.env`, as python-dotenv does by default, so a deployment
    can override a checked-in file.
    """
    merged: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    merged.update(os.environ if env is None else env)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = f.name.upper()
        if key in merged and merged[key].strip() != "":
            values[f.name] = _convert(key, merged[key], f)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def written(value: Any) -> str:
    """A setting's value as a user writes it in `.env`: `1,2` not `(1, 2)`, empty not `.`."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path) and str(value) == ".":
        return ""
    return str(value)


def env_example() -> str:
    """The text of `.env.example`: every key, its default and what it does."""
    lines = [
        "# hermes-discord settings. Copy to .env and fill in DISCORD_TOKEN.",
        "# The process environment overrides this file.",
        "",
    ]
    for f in fields(Settings):
        meta = f.metadata
        default = written(f.default)
        extra = f" ({'|'.join(meta['choices'])})" if meta["choices"] else ""
        lines.append(f"# {meta['help']}{extra}")
        lines.append(f"{f.name.upper()}={default}")
        lines.append("")
    return "\n".join(lines)


def settings_table() -> str:
    """The README's settings table, in Markdown."""
    rows = ["| Key | Default | What it does |", "|---|---|---|"]
    for f in fields(Settings):
        meta = f.metadata
        default = written(f.default)
        extra = f" One of: {', '.join(meta['choices'])}." if meta["choices"] else ""
        rng = f" Range {meta['lo']}–{meta['hi']}." if meta["lo"] is not None and meta["hi"] else ""
        admin = " Per server/channel: `/admin settings set`." if meta["tunable"] else ""
        rows.append(f"| `{f.name.upper()}` | `{default}` | {meta['help']}{extra}{rng}{admin} |")
    return "\n".join(rows)
