"""Terminal chat through the same settings, memory, prompt and engine as the Discord bot.

Useful to try a model or a persona before inviting the bot anywhere, and scriptable: it reads
piped stdin as well as a terminal.

Each run starts a fresh conversation (the earlier ones stay stored, hidden behind a forget
watermark as `/reset` does) unless `resume` is set. Ctrl-C at the `you>` prompt leaves (exit 0);
Ctrl-C while a reply streams cancels that reply and the console goes on, and a second Ctrl-C
before the reply has stopped leaves (exit 130). Stdin is read through the event loop, never by a
blocked thread, so nothing holds the process open once the user wants out.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import Awaitable
from typing import TextIO, TypeVar

from bot.conversation import Conversations
from bot.engine import Engine
from bot.memory import Memory
from bot.personas import PersonaLibrary, load_builtin_personas
from bot.settings import Settings

#: The console's conversation is stored like a Discord channel with this id ("console").
CONSOLE_CHANNEL = 0
HELP = "Type a message. /reset forgets the conversation, /quit (or Ctrl-C) leaves."
#: Exit status after a second Ctrl-C during a reply (128 + SIGINT, as shells report it).
INTERRUPTED = 130

T = TypeVar("T")


class LineReader:
    """Lines from `stream` without a thread blocked in `readline`.

    Pipes and terminals are watched by the event loop (`add_reader`) and read with `os.read`;
    regular files, /dev/null and in-memory streams never block and are read directly. Only a
    loop without `add_reader` (Windows) falls back to a worker thread.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._buffer = b""
        self._eof = False
        self._fd: int | None = None
        self._mode = "direct"
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            return
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(fd, lambda: None)
            loop.remove_reader(fd)
        except NotImplementedError:
            self._mode = "thread"
        except (OSError, ValueError):  # a regular file or /dev/null: always ready, read directly
            pass
        else:
            self._fd, self._mode = fd, "loop"

    async def readline(self) -> str:
        """The next line with its newline, or "" at end of input."""
        if self._mode == "direct":
            return self.stream.readline()
        if self._mode == "thread":
            return await asyncio.to_thread(self.stream.readline)
        assert self._fd is not None
        while b"\n" not in self._buffer and not self._eof:
            await self._wait_readable(self._fd)
            chunk = os.read(self._fd, 65536)
            if chunk:
                self._buffer += chunk
            else:
                self._eof = True
        line, newline, rest = self._buffer.partition(b"\n")
        self._buffer = rest
        return (line + newline).decode(self.encoding, errors="replace")

    @staticmethod
    async def _wait_readable(fd: int) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)


class Interrupts:
    """What Ctrl-C means now: leave at the prompt, cancel a reply, leave on a second press."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()
        self.code = 0
        self.reply: asyncio.Task[None] | None = None
        self.cancelling = False

    def press(self) -> str:
        """Handle one Ctrl-C; returns what it did ("leave", "cancel" or "abort")."""
        if self.reply is None or self.reply.done():
            self.leave.set()
            return "leave"
        if not self.cancelling:
            self.cancelling = True
            self.reply.cancel()
            return "cancel"
        self.code = INTERRUPTED
        self.leave.set()
        return "abort"

    def start(self, reply: asyncio.Task[None]) -> None:
        self.reply, self.cancelling = reply, False


async def persona_problem(library: PersonaLibrary, persona: str | None) -> str | None:
    """One line when `persona` names no persona the console can play, else None."""
    if not persona or await library.get(persona, None) is not None:
        return None
    names = ", ".join(await library.names(None))
    return f"no persona called {persona!r}; choose one of: {names}"


def console_personas(
    settings: Settings, memory: Memory | None = None, *, report: bool = True
) -> PersonaLibrary:
    """The personas the console can play (the built-ins); broken files are reported on stderr."""
    builtins, problems = load_builtin_personas(settings.personas_dir)
    for problem in problems if report else ():
        print(f"(persona skipped: {problem})", file=sys.stderr)
    return PersonaLibrary(builtins, memory)


async def run_console(
    settings: Settings,
    engine: Engine,
    *,
    show_prompt: bool = False,
    user: str = "User",
    persona: str | None = None,
    resume: bool = False,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    interactive = stdin.isatty()
    memory = await Memory.open(settings.db_path)
    loop = asyncio.get_running_loop()
    interrupts = Interrupts()
    handled = False
    try:
        library = console_personas(settings, memory)
        if problem := await persona_problem(library, persona):
            print(f"hermes-bot: {problem}", file=sys.stderr)
            return 2
        if not resume:  # a fresh conversation; the earlier ones stay stored
            await memory.turns.forget(CONSOLE_CHANNEL)
        await engine.start()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, lambda: _on_interrupt(interrupts, stdout))
            handled = True
        conv = Conversations(settings, memory, engine, personas=library)
        reader = LineReader(stdin)
        if interactive:
            print(f"hermes console: {engine.info.model}. {HELP}", file=stdout)
        if show_prompt:  # decided once for the model: shown once, before the first prompt
            print(f"prompt format: {conv.fmt.describe()}", file=stdout, flush=True)
        while not interrupts.leave.is_set():
            if interactive:
                print("you> ", end="", file=stdout, flush=True)
            line = await _until_left(reader.readline(), interrupts)
            if line is None or not line:  # Ctrl-C, or EOF (piped input ended, Ctrl-D)
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                await memory.turns.forget(CONSOLE_CHANNEL)
                print("(conversation forgotten)", file=stdout, flush=True)
                continue
            if text == "/help":
                print(HELP, file=stdout, flush=True)
                continue
            reply = asyncio.create_task(
                _reply(conv, text, user=user, persona=persona, show_prompt=show_prompt, out=stdout)
            )
            interrupts.start(reply)
            with contextlib.suppress(asyncio.CancelledError):
                await _until_left(reply, interrupts)
            if reply.cancelled():
                print("\n(reply cancelled)", file=stdout, flush=True)
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGINT)
        if interrupts.reply is not None and not interrupts.reply.done():
            interrupts.reply.cancel()  # a second Ctrl-C does not wait long for a stuck reply
            await asyncio.wait({interrupts.reply}, timeout=2)
        await engine.close()
        await memory.close()
    return interrupts.code


def _on_interrupt(interrupts: Interrupts, stdout: TextIO) -> None:
    if interrupts.press() == "leave":
        print(file=stdout, flush=True)  # end the `you>` line so the shell prompt starts clean


async def _until_left(awaitable: Awaitable[T], interrupts: Interrupts) -> T | None:
    """The awaitable's result, or None as soon as the user asked to leave."""
    task = asyncio.ensure_future(awaitable)
    leave = asyncio.ensure_future(interrupts.leave.wait())
    try:
        await asyncio.wait({task, leave}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leave.cancel()
    if task.done():
        return task.result()
    if not isinstance(awaitable, asyncio.Task):  # a read we started: stop it
        task.cancel()
    return None


async def _reply(
    conv: Conversations,
    text: str,
    *,
    user: str,
    persona: str | None,
    show_prompt: bool,
    out: TextIO,
) -> None:
    """Store `text`, stream the reply to `out`, store the reply (not when cancelled)."""
    turn_id = await conv.record_user(CONSOLE_CHANNEL, text, name=user)
    job = await conv.prepare(CONSOLE_CHANNEL, reply_to=turn_id, persona=persona)
    assert job is not None  # just stored, nothing else deletes console turns
    if show_prompt:
        print(f"----- prompt ({job.prompt.tokens} tokens max) -----", file=out)
        print(job.prompt.text, end="", file=out)
        print("----- end prompt -----", file=out, flush=True)
    for note in job.notes:
        print(f"({note})", file=out)
    print(f"{job.bot_name}> ", end="", file=out, flush=True)
    shown = ""
    async for partial in conv.stream(job):
        if partial.startswith(shown):
            print(partial[len(shown) :], end="", file=out, flush=True)
            shown = partial
    if job.text != shown:  # cleaning shortened an already printed tail
        print(f"\n{job.bot_name}> {job.text}", end="", file=out)
    print(file=out, flush=True)
    if job.stats and job.stats.finish_reason != "error":
        await conv.record_assistant(
            CONSOLE_CHANNEL, job.text, name=job.bot_name, persona=job.persona
        )
