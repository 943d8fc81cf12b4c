"""The console as a session: Ctrl-C, a fresh conversation per run, --resume, persona switches.

Everything runs `python -m bot console` as a user would. Ctrl-C is a real SIGINT sent once the
console has shown what the user would react to (the `you>` prompt, the first words of a reply),
so nothing depends on timing. The console needs a terminal to show its prompt: stdin is a pty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from bot.prompt import render_turn
from tests.conftest import subprocess_env
from tests.test_openai_engine import free_port

PROMPT = re.compile(r"----- prompt \((\d+) tokens max\) -----\n(.*?)----- end prompt -----\n", re.S)
WAIT = 180  # seconds; a safety net for a stuck process, never an assertion


def console_env(folder: Path) -> dict[str, str]:
    env = subprocess_env(folder)
    env.update(MAX_NEW_TOKENS="8", TEMPERATURE="0", LOG_LEVEL="WARNING")
    return env


def console(
    args: list[str], env: dict[str, str], cwd: Path, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", "console", *args],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=WAIT,
    )


class Terminal:
    """`python -m bot console` with a pty for stdin and a pipe for stdout."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc = proc
        self.master = master
        self.out = ""

    @classmethod
    async def start(cls, args: list[str], env: dict[str, str], cwd: Path) -> Terminal:
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "console", *args,
            stdin=slave, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, cwd=cwd,
        )  # fmt: skip
        os.close(slave)
        return cls(proc, master)

    async def wait_for(self, text: str, start: int = 0) -> int:
        """Read stdout until `text` appears at or after `start`; returns where it ends."""
        assert self.proc.stdout is not None
        while (at := self.out.find(text, start)) < 0:
            chunk = await asyncio.wait_for(self.proc.stdout.read(4096), WAIT)
            if not chunk:
                raise AssertionError(f"console ended before {text!r}; stdout: {self.out!r}")
            self.out += chunk.decode("utf-8", errors="replace")
        return at + len(text)

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    async def finish(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), WAIT)
        os.close(self.master)
        return self.proc.returncode or 0, self.out + out.decode(), err.decode()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


async def test_ctrl_c_at_the_prompt_leaves_with_0(tiny_model: Path, tmp_path: Path):
    term = await Terminal.start(["--model", str(tiny_model)], console_env(tmp_path), tmp_path)
    try:
        await term.wait_for("you> ")
        term.interrupt()
        code, out, err = await term.finish()
    finally:
        term.kill()
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert out.startswith("hermes console:") and out.endswith("you> \n")


class Endless:
    """An OpenAI-compatible server whose reply starts ("Hello") and then never goes on."""

    def __init__(self) -> None:
        self.hung_up = asyncio.Event()
        self.requests = 0
        self.url = ""

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"choices": [{"index": 0, "text": "Hello", "finish_reason": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.05)  # until the client hangs up
        self.hung_up.set()
        return resp


@pytest.fixture
async def endless() -> AsyncIterator[Endless]:
    server = Endless()
    app = web.Application()
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "hermes"}]}))
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_ctrl_c_during_a_reply_cancels_it_and_the_console_goes_on(
    endless: Endless, tiny_model: Path, tmp_path: Path
):
    env = console_env(tmp_path)
    env.update(ENGINE="openai", OPENAI_BASE_URL=endless.url, OPENAI_MODEL="hermes")
    env.update(TOKENIZER=str(tiny_model))
    term = await Terminal.start([], env, tmp_path)
    try:
        at = await term.wait_for("you> ")
        term.type("tell me a very long story")
        at = await term.wait_for("Hermes> Hello", at)
        term.interrupt()  # first Ctrl-C: the reply stops, the console stays
        at = await term.wait_for("(reply cancelled)", at)
        await asyncio.wait_for(endless.hung_up.wait(), WAIT)  # the server was hung up on
        at = await term.wait_for("you> ", at)
        term.interrupt()  # at the prompt: leave
        code, out, err = await term.finish()
    finally:
        term.kill()
    assert code == 0, err
    assert "Traceback" not in err
    assert endless.requests == 1
    con = sqlite3.connect(env["DB_PATH"])
    try:
        rows = con.execute("SELECT role, content FROM turns WHERE channel_id = 0").fetchall()
    finally:
        con.close()
    assert rows == [("user", "tell me a very long story")]  # the cancelled reply is not stored


def test_unknown_persona_exits_2_with_one_line_before_loading_anything(tmp_path: Path):
    # the model does not exist either: the persona is checked first, so that is not reported
    run = console(
        ["--persona", "Nobody", "--model", "/no/such/model"], console_env(tmp_path), tmp_path
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "hermes-bot: no persona called 'Nobody'; choose one of: Grumbold, Hermes, MIRA, Sable"
    ]
    assert run.stdout == ""


def prompts(stdout: str) -> list[str]:
    return [text for _, text in PROMPT.findall(stdout)]


def assistant_turns(db: str) -> list[tuple[str, str | None, str]]:
    con = sqlite3.connect(db)
    try:
        return con.execute(
            "SELECT name, persona, content FROM turns WHERE role = 'assistant' ORDER BY id"
        ).fetchall()
    finally:
        con.close()


def test_each_run_is_fresh_unless_resumed_and_personas_keep_their_own_turns(
    tiny_model: Path, tmp_path: Path
):
    env = console_env(tmp_path)
    model = ["--model", str(tiny_model), "--show-prompt"]

    first = console(model, env, tmp_path, "remember the word apricot\n")
    assert first.returncode == 0, first.stderr
    second = console(model, env, tmp_path, "what word did I say?\n")  # a new run: fresh
    assert second.returncode == 0, second.stderr
    (prompt,) = prompts(second.stdout)
    assert "apricot" not in prompt
    assert prompt.endswith("### Instruction:\nUser: what word did I say?\n\n### Response:\n")

    resumed = console([*model, "--resume"], env, tmp_path, "and now?\n")
    assert resumed.returncode == 0, resumed.stderr
    (prompt,) = prompts(resumed.stdout)
    assert "what word did I say?" in prompt and "apricot" not in prompt
    hermes_reply = assistant_turns(env["DB_PATH"])[1][2]
    assert render_turn("assistant", hermes_reply) in prompt  # Hermes's own turn, as before

    # Another persona resumes the conversation: Hermes's replies are Hermes's named lines,
    # never Grumbold's own turns.
    switched = console([*model, "--resume", "--persona", "Grumbold"], env, tmp_path, "who?\n")
    assert switched.returncode == 0, switched.stderr
    (prompt,) = prompts(switched.stdout)
    hermes_replies = [c for name, persona, c in assistant_turns(env["DB_PATH"]) if persona is None]
    for reply in hermes_replies[1:]:  # the ones of the resumed conversation
        assert render_turn("user", reply, "Hermes") in prompt
        assert render_turn("assistant", reply) not in prompt
    assert "Grumbold> " in switched.stdout
    stored = assistant_turns(env["DB_PATH"])
    assert [(name, persona) for name, persona, _ in stored] == [
        ("Hermes", None),
        ("Hermes", None),
        ("Hermes", None),
        ("Grumbold", "Grumbold"),
    ]
    con = sqlite3.connect(env["DB_PATH"])
    try:
        (users,) = con.execute("SELECT COUNT(*) FROM turns WHERE role = 'user'").fetchone()
    finally:
        con.close()
    assert users == 4  # fresh runs hide earlier turns; nothing is deleted
