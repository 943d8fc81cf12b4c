"""`hermes-bot` / `python -m bot`: run the Discord bot, chat in the terminal, check the setup,
benchmark the model on this machine, or convert a .gguf file to a folder.

Every failure a user can fix is one line on stderr and a non-zero exit (2 for bad input such as
settings, a missing --env-file or an unknown persona), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from importlib import metadata
from pathlib import Path

from bot.settings import Settings, SettingsError, env_example, load_settings, settings_table

DESCRIPTION = (
    "Run the Discord bot, chat with the model in the terminal, check the setup, or benchmark "
    "the model on this machine. "
    "Settings come from the environment and .env (see .env.example)."
)


def _fail(message: str, code: int = 2) -> int:
    print(f"hermes-bot: {message}", file=sys.stderr)
    return code


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("discord.gateway", "discord.client", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger().level))


def cmd_run(settings: Settings) -> int:
    if not settings.discord_token:
        return _fail(
            "DISCORD_TOKEN is not set. Create a bot at https://discord.com/developers/applications, "
            "copy its token, and put DISCORD_TOKEN=... in .env (see .env.example) or export it."
        )
    from bot.discord.client import run_bot

    return run_bot(settings)


def cmd_console(settings: Settings, args: argparse.Namespace) -> int:
    from bot.console import console_personas, persona_problem, run_console
    from bot.engine import EngineError, make_engine
    from bot.model_source import ModelSourceError, resolve_engine_sources
    from bot.store.db import UnusableDatabaseError

    # Cheap checks first: a typo in --persona or MODEL never waits for a model to load.
    problem = asyncio.run(persona_problem(console_personas(settings, report=False), args.persona))
    if problem:
        return _fail(problem)
    try:
        settings, model = resolve_engine_sources(settings, args.model)
        engine = make_engine(settings, model=model)
        return asyncio.run(
            run_console(
                settings,
                engine,
                show_prompt=args.show_prompt,
                user=args.user,
                persona=args.persona,
                resume=args.resume,
            )
        )
    except ModelSourceError as exc:
        return _fail(str(exc), 1)
    except (EngineError, UnusableDatabaseError) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        return 130


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from bot.doctor import doctor

    return asyncio.run(
        doctor(
            settings,
            model=args.model,
            load_model=not args.skip_model,
            check_token=not args.skip_token,
        )
    )


def cmd_convert(gguf: str, out: str) -> int:
    """`hermes-bot convert FILE.gguf OUT/`: dequantize once, so MODEL=OUT loads in seconds."""
    from bot.gguf import GGUFError, convert_gguf, is_gguf

    if not is_gguf(gguf):
        return _fail(f"convert reads a .gguf file, not {gguf!r}")
    try:
        folder = convert_gguf(gguf, out)
    except GGUFError as exc:
        return _fail(str(exc), 1)
    except OSError as exc:
        return _fail(f"cannot write {out}: {exc}", 1)
    print(f"wrote {folder}; set MODEL={folder}")
    return 0


def version() -> str:
    try:
        return metadata.version("hermes-discord")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermes-bot", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "--env-file",
        help="settings file (default: .env when it exists; the environment wins over it)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Discord bot")
    console = sub.add_parser("console", help="chat in the terminal (reads piped stdin too)")
    console.add_argument("--model", help="model folder, .gguf file or hub id (overrides MODEL)")
    console.add_argument(
        "--show-prompt",
        action="store_true",
        help="print the exact prompt sent to the model before each reply",
    )
    console.add_argument("--user", default="User", help="your name in the conversation")
    console.add_argument("--persona", help="talk to a built-in persona (e.g. Grumbold)")
    console.add_argument(
        "--resume",
        action="store_true",
        help="go on with the last console conversation (default: start a fresh one)",
    )
    doctor = sub.add_parser("doctor", help="check settings, database and model loading")
    doctor.add_argument("--model", help="model folder, .gguf file or hub id (overrides MODEL)")
    doctor.add_argument("--skip-model", action="store_true", help="do not load the model")
    doctor.add_argument(
        "--skip-token",
        action="store_true",
        help="do not count a missing DISCORD_TOKEN as a problem (offline checks)",
    )
    bench = sub.add_parser("bench", help="measure MODEL on this machine (load, tokens/s, TTFT)")
    bench.add_argument("--model", help="model folder, .gguf file or hub id (overrides MODEL)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.add_argument("--tokens", type=int, default=128, help="reply tokens per request")
    bench.add_argument("--trials", type=int, default=3, help="messages timed for first token")
    bench.add_argument(
        "--quant",
        help="compare quantizations on the same model in one run, e.g. none,8bit,4bit: load "
        "time, footprint, one-stream and MAX_BATCH-channel tokens/s (bot/bench_quant.py)",
    )
    bench.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="URL",
        help="also measure this OpenAI-compatible server (base URL with /v1), a column beside "
        "the engine; repeatable",
    )
    bench.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side table")
    convert = sub.add_parser(
        "convert", help="write a .gguf file's model and tokenizer as a plain folder, once"
    )
    convert.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file (llama.cpp's format)")
    convert.add_argument("out", metavar="OUT/", help="the folder to write (must not exist)")
    sub.add_parser("env-example", help="print .env.example")
    sub.add_parser("settings-table", help="print the README settings table")
    args = parser.parse_args(argv)

    if args.command == "env-example":
        print(env_example())
        return 0
    if args.command == "settings-table":
        print(settings_table())
        return 0
    if args.command == "convert":
        return cmd_convert(args.gguf, args.out)
    if args.env_file is not None and not Path(args.env_file).is_file():
        return _fail(f"--env-file {args.env_file}: no such file ({Path(args.env_file).absolute()})")
    try:
        settings = load_settings(env_file=Path(args.env_file or ".env"))
    except SettingsError as exc:
        return _fail(str(exc))
    _setup_logging(settings)
    if args.command == "run":
        return cmd_run(settings)
    if args.command == "console":
        return cmd_console(settings, args)
    if args.command == "bench":
        from bot.benchmark import main as bench_main

        if args.quant:
            from bot.bench_quant import main as quant_main

            return quant_main(
                settings, args.quant, model=args.model, as_json=args.json, tokens=args.tokens
            )
        return bench_main(
            settings, model=args.model, as_json=args.json, tokens=args.tokens, trials=args.trials,
            servers=args.server, rounds=args.rounds,
        )  # fmt: skip
    return cmd_doctor(settings, args)


if __name__ == "__main__":
    sys.exit(main())
