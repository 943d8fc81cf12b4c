"""Terminal chat through the same settings, memory, prompt and engine as the Discord bot.

Useful to try a model or a persona before inviting the bot anywhere, and scriptable: it reads
piped stdin as well as a terminal.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from bot.conversation import Conversations
from bot.engine import Engine
from bot.memory import Memory
from bot.personas import PersonaLibrary, load_builtin_personas
from bot.settings import Settings

#: The console's conversation is stored like a Discord channel with this id ("console").
CONSOLE_CHANNEL = 0
HELP = "Type a message. /reset forgets the conversation, /quit leaves."


async def run_console(
    settings: Settings,
    engine: Engine,
    *,
    show_prompt: bool = False,
    user: str = "User",
    persona: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    interactive = stdin.isatty()
    memory = await Memory.open(settings.db_path)
    try:
        await engine.start()
        builtins, problems = load_builtin_personas(settings.personas_dir)
        for problem in problems:
            print(f"(persona skipped: {problem})", file=sys.stderr)
        library = PersonaLibrary(builtins, memory)
        if persona and await library.get(persona, None) is None:
            names = ", ".join(await library.names(None))
            print(
                f"hermes-bot: no persona called {persona!r}; choose one of: {names}",
                file=sys.stderr,
            )
            return 2
        conv = Conversations(settings, memory, engine, personas=library)
        if interactive:
            print(f"hermes console: {engine.info.model}. {HELP}", file=stdout)
        while True:
            if interactive:
                print("you> ", end="", file=stdout, flush=True)
            line = await asyncio.to_thread(stdin.readline)
            if not line:  # EOF: piped input ended, or Ctrl-D
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                await memory.forget(CONSOLE_CHANNEL)
                print("(conversation forgotten)", file=stdout, flush=True)
                continue
            if text == "/help":
                print(HELP, file=stdout, flush=True)
                continue
            turn_id = await conv.record_user(CONSOLE_CHANNEL, text, name=user)
            job = await conv.prepare(CONSOLE_CHANNEL, reply_to=turn_id, persona=persona)
            assert job is not None  # just stored, nothing else deletes console turns
            if show_prompt:
                print(f"----- prompt ({job.prompt.tokens} tokens max) -----", file=stdout)
                print(job.prompt.text, end="", file=stdout)
                print("----- end prompt -----", file=stdout, flush=True)
            for note in job.notes:
                print(f"({note})", file=stdout)
            print(f"{job.bot_name}> ", end="", file=stdout, flush=True)
            shown = ""
            async for partial in conv.stream(job):
                if partial.startswith(shown):
                    print(partial[len(shown) :], end="", file=stdout, flush=True)
                    shown = partial
            if job.text != shown:  # cleaning shortened an already printed tail
                print(f"\n{job.bot_name}> {job.text}", end="", file=stdout)
            print(file=stdout, flush=True)
            if job.stats and job.stats.finish_reason != "error":
                await conv.record_assistant(
                    CONSOLE_CHANNEL, job.text, name=job.bot_name, persona=job.persona
                )
    finally:
        await engine.close()
        await memory.close()
    return 0
