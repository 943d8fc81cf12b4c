"""`hermes-bot doctor`: say what the bot would find, before it meets Discord.

Every check that would stop `hermes-bot run` (no token, a database it cannot open, a model or
tokenizer it cannot load, a metrics port in use) is a problem and makes the exit status 1;
things `run` survives (a skipped persona file) are notes. Settings are shown as they would be
written in `.env`, secrets only as set or not set.
"""

from __future__ import annotations

import contextlib
import socket
import time

from bot.engine import Engine, EngineError, GenerationParams, make_engine
from bot.engine_choice import choose_engine
from bot.memory import Memory
from bot.model_source import ModelSourceError, resolve_engine_sources
from bot.personas import load_builtin_personas
from bot.prompt import Turn
from bot.prompt_template import TemplateError, choose_format
from bot.settings import Settings
from bot.store.db import SCHEMA_VERSION


class Report:
    """Counts problems while printing what was found."""

    def __init__(self) -> None:
        self.problems = 0

    def problem(self, text: str) -> None:
        self.problems += 1
        print(f"  PROBLEM: {text}")


def port_free(port: int) -> bool:
    """Whether this machine can listen on `port` (as the metrics exporter will, on all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


async def check_database(settings: Settings, report: Report) -> None:
    print(f"database: {settings.db_path.resolve()}")
    try:
        memory = await Memory.open(settings.db_path)
    except Exception as exc:  # report every failure, never a traceback
        report.problem(str(exc))
        return
    try:
        cur = await memory.db.execute("SELECT COUNT(*), COUNT(DISTINCT channel_id) FROM turns")
        turns, channels = await cur.fetchone()  # type: ignore[misc]
        check = await (await memory.db.execute("PRAGMA integrity_check")).fetchone()
        integrity = check[0] if check else "?"
        print(
            f"  schema v{SCHEMA_VERSION}, {turns} turns in {channels} channels, "
            f"integrity {integrity}"
        )
        if integrity != "ok":
            report.problem(f"integrity check: {integrity}")
        if memory.fts:
            print("  long-term recall: on (SQLite full-text search, FTS5)")
        else:  # not a problem: everything else works without it
            print(
                "  long-term recall: off, this SQLite build has no full-text search (FTS5); "
                "a Python built with a newer SQLite turns it on"
            )
    except Exception as exc:
        report.problem(str(exc))
    finally:
        await memory.close()


async def check_model(settings: Settings, model: str | None, report: Report) -> None:
    name = model or settings.model
    kind = choose_engine(settings, name)[0]
    if kind == "openai":
        served = settings.openai_model or name
        print(f"model: {served} on {settings.openai_base_url} (engine openai)")
    else:
        print(f"model: {name} (engine {kind})")
    engine: Engine | None = None
    try:
        settings, model = resolve_engine_sources(settings, model)
        engine = make_engine(settings, model=model)
        start = time.perf_counter()
        await engine.start()
        info = engine.info
        print(
            f"  loaded in {time.perf_counter() - start:.1f}s: {info.describe()}"
        )
        for note in info.notes:  # why this engine; which settings reach a server
            print(f"  {note}")
        fmt = choose_format(settings.prompt_format, engine.tokenizer)
        print(f"  prompt format: {fmt.describe()}")
        begin = time.perf_counter()
        # The same stops and cleaning as a reply in a channel: what it shows is what would post.
        gen = engine.generate(
            fmt.render_chat("", [Turn("user", "Say hello.")]),
            GenerationParams(
                max_new_tokens=8, temperature=0.0, stop=tuple(fmt.stops()), stop_ids=fmt.end_ids
            ),
        )
        text = fmt.clean(await gen.text_all())
        print(f"  test reply in {time.perf_counter() - begin:.2f}s: {text.strip()[:60]!r}")
    except (ModelSourceError, EngineError, TemplateError) as exc:
        report.problem(str(exc))
    finally:
        if engine is not None:
            with contextlib.suppress(Exception):
                await engine.close()


async def doctor(
    settings: Settings,
    *,
    model: str | None = None,
    load_model: bool = True,
    check_token: bool = True,
) -> int:
    report = Report()
    print("settings:")
    for key, value in settings.as_written().items():
        print(f"  {key} = {value}")
    if settings.discord_token:
        print("discord: token is set")
    elif check_token:
        print("discord:")
        report.problem(
            "DISCORD_TOKEN is not set; hermes-bot run refuses to start without it "
            "(--skip-token for offline checks)"
        )
    else:
        print("discord: token is not set (not checked: --skip-token)")
    if settings.metrics_port and not port_free(settings.metrics_port):
        report.problem(f"METRICS_PORT={settings.metrics_port} is already in use on this machine")
    await check_database(settings, report)
    personas, persona_problems = load_builtin_personas(settings.personas_dir)
    print(f"personas: {', '.join(p.name for p in personas.values()) or 'none'}")
    for note in persona_problems:  # `run` skips a broken persona file and goes on
        print(f"  note: persona skipped: {note}")
    if load_model:
        await check_model(settings, model, report)
    if report.problems:
        print(f"{report.problems} problem(s) found")
        return 1
    print("all good")
    return 0
