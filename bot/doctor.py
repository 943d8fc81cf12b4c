"""`hermes-bot doctor`: say what the bot would find, before it meets Discord."""

from __future__ import annotations

import time

from bot.engine import EngineError, GenerationParams, engine_from_settings
from bot.memory import SCHEMA_VERSION, Memory
from bot.settings import Settings


async def doctor(settings: Settings, *, model: str | None = None, load_model: bool = True) -> int:
    ok = True
    print("settings:")
    for key, value in settings.redacted().items():
        print(f"  {key} = {value}")
    print(f"database: {settings.db_path.resolve()}")
    try:
        memory = await Memory.open(settings.db_path)
        cur = await memory.db.execute("SELECT COUNT(*), COUNT(DISTINCT channel_id) FROM turns")
        turns, channels = await cur.fetchone()  # type: ignore[misc]
        check = await (await memory.db.execute("PRAGMA integrity_check")).fetchone()
        print(
            f"  schema v{SCHEMA_VERSION}, {turns} turns in {channels} channels, "
            f"integrity {check[0]}"
        )  # type: ignore[index]
        ok &= check[0] == "ok"  # type: ignore[index]
        await memory.close()
    except Exception as exc:  # report every failure, never a traceback
        print(f"  FAILED: {exc}")
        ok = False
    if not settings.discord_token:
        print("discord: DISCORD_TOKEN is not set (needed for `hermes-bot run`)")
    else:
        print("discord: token is set")
    if load_model:
        print(f"model: {model or settings.model} (engine {settings.engine})")
        try:
            engine = engine_from_settings(settings, model=model)
            start = time.perf_counter()
            await engine.start()
            info = engine.info
            print(
                f"  loaded in {time.perf_counter() - start:.1f}s: dtype {info.dtype}, "
                f"quantization {info.quantization}, device {info.device}"
            )
            begin = time.perf_counter()
            gen = engine.generate(
                "### Instruction:\nSay hello.\n\n### Response:\n",
                GenerationParams(max_new_tokens=8, temperature=0.0),
            )
            text = await gen.text_all()
            print(f"  test reply in {time.perf_counter() - begin:.2f}s: {text.strip()[:60]!r}")
            await engine.close()
        except EngineError as exc:
            print(f"  FAILED: {exc}")
            ok = False
    print("all good" if ok else "problems found")
    return 0 if ok else 1
