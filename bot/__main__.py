"""`hermes-bot` / `python -m bot`: run the Discord bot, chat in the terminal, check the setup, or
benchmark the model on this machine."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from bot.settings import Settings, SettingsError, env_example, load_settings, settings_table


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
    from bot.app import run_bot

    return run_bot(settings)


def cmd_console(settings: Settings, args: argparse.Namespace) -> int:
    from bot.console import run_console
    from bot.engine import EngineError, engine_from_settings
    from bot.memory import MemoryError_

    try:
        engine = engine_from_settings(settings, model=args.model)
        return asyncio.run(
            run_console(
                settings, engine, show_prompt=args.show_prompt, user=args.user, persona=args.persona
            )
        )
    except (EngineError, MemoryError_) as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from bot.doctor import doctor

    return asyncio.run(doctor(settings, model=args.model, load_model=not args.skip_model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermes-bot", description=__doc__)
    parser.add_argument("--env-file", default=".env", help="settings file (default: .env)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the Discord bot")
    console = sub.add_parser("console", help="chat in the terminal (reads piped stdin too)")
    console.add_argument("--model", help="model folder or hub id (overrides MODEL)")
    console.add_argument(
        "--show-prompt",
        action="store_true",
        help="print the exact prompt sent to the model before each reply",
    )
    console.add_argument("--user", default="User", help="your name in the conversation")
    console.add_argument("--persona", help="talk to a built-in persona (e.g. Grumbold)")
    doctor = sub.add_parser("doctor", help="check settings, database and model loading")
    doctor.add_argument("--model", help="model folder or hub id (overrides MODEL)")
    doctor.add_argument("--skip-model", action="store_true", help="do not load the model")
    bench = sub.add_parser("bench", help="measure MODEL on this machine (load, tokens/s, TTFT)")
    bench.add_argument("--model", help="model folder or hub id (overrides MODEL)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bench.add_argument("--tokens", type=int, default=128, help="reply tokens per request")
    bench.add_argument("--trials", type=int, default=3, help="messages timed for first token")
    sub.add_parser("env-example", help="print .env.example")
    sub.add_parser("settings-table", help="print the README settings table")
    args = parser.parse_args(argv)

    if args.command == "env-example":
        print(env_example())
        return 0
    if args.command == "settings-table":
        print(settings_table())
        return 0
    try:
        settings = load_settings(env_file=Path(args.env_file))
    except SettingsError as exc:
        return _fail(str(exc))
    _setup_logging(settings)
    if args.command == "run":
        return cmd_run(settings)
    if args.command == "console":
        return cmd_console(settings, args)
    if args.command == "bench":
        from bot.benchmark import main as bench_main

        return bench_main(
            settings, model=args.model, as_json=args.json, tokens=args.tokens, trials=args.trials
        )
    return cmd_doctor(settings, args)


if __name__ == "__main__":
    sys.exit(main())
