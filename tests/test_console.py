"""The terminal chat, driven as a user would: a subprocess fed through a pipe.

The three runs start together (they mostly wait on imports), then each test checks one.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.settings import Settings
from tests.conftest import subprocess_env

SYSTEM = Settings().system_prompt
PROMPT = re.compile(r"----- prompt \((\d+) tokens max\) -----\n(.*?)----- end prompt -----\n", re.S)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    folder: Path


def first_prompt(message: str) -> str:
    return f"### Input:\n{SYSTEM}\n\n### Instruction:\nUser: {message}\n\n### Response:\n"


@pytest.fixture(scope="module")
def runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run | None]:
    script = Path(sys.executable).parent / "hermes-bot"
    script_path = str(script) if script.is_file() else shutil.which("hermes-bot")
    plans: dict[str, tuple[list[str] | None, str | None]] = {
        "piped": (
            [sys.executable, "-m", "bot", "console", "--model", str(tiny_model), "--show-prompt"],
            "hello bot\nwhat is up?\n/reset\n\nthird message\n/quit\nnever read\n",
        ),
        "eof": (
            [script_path, "console", "--model", str(tiny_model)] if script_path else None,
            None,
        ),
        "missing": ([sys.executable, "-m", "bot", "console", "--model", "no-such-model-dir"], ""),
        "future-db": ([sys.executable, "-m", "bot", "console", "--model", str(tiny_model)], "hi\n"),
    }
    procs: dict[str, tuple[subprocess.Popen[str], str | None, Path]] = {}
    results: dict[str, Run | None] = {}
    try:
        for name, (argv, stdin) in plans.items():
            if argv is None:
                results[name] = None
                continue
            folder = tmp_path_factory.mktemp(f"console-{name}")
            env = subprocess_env(folder)
            env.update(MAX_NEW_TOKENS="8", TEMPERATURE="0", LOG_LEVEL="WARNING")
            if name == "future-db":  # written by a newer bot
                con = sqlite3.connect(env["DB_PATH"])
                con.execute("PRAGMA user_version=99")
                con.close()
            proc = subprocess.Popen(
                argv,
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                encoding="utf-8",
            )
            procs[name] = (proc, stdin, folder)
        for name, (proc, stdin, folder) in procs.items():
            out, err = proc.communicate(stdin, timeout=240)
            results[name] = Run(proc.returncode, out, err, folder)
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def test_piped_conversation(runs: dict[str, Run | None]):
    run = runs["piped"]
    assert run is not None
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    prompts = [text for _, text in PROMPT.findall(run.stdout)]
    assert len(prompts) == 3, run.stdout
    first, second, third = prompts
    # the model card's layout, with the system text in an Input block
    assert first == first_prompt("hello bot")
    # the second prompt holds the first exchange: the first prompt, the reply, the new message
    assert second.startswith(first)
    assert second.endswith("\n\n### Instruction:\nUser: what is up?\n\n### Response:\n")
    assert second.count("### Response:\n") == 2 and second.count("### Instruction:\n") == 2
    # after /reset the first exchange is gone
    assert third == first_prompt("third message")
    assert "hello bot" not in third
    assert "(conversation forgotten)" in run.stdout
    assert run.stdout.count("Hermes> ") == 3
    assert "never read" not in run.stdout  # /quit stopped reading


def test_piped_conversation_is_stored(runs: dict[str, Run | None]):
    run = runs["piped"]
    assert run is not None and run.returncode == 0
    con = sqlite3.connect(run.folder / "cli.db")
    try:
        rows = con.execute("SELECT id, role, name, content FROM turns ORDER BY id").fetchall()
        (watermark,) = con.execute("SELECT forget_before FROM channels").fetchone()
    finally:
        con.close()
    assert [(role, name) for _, role, name, _ in rows] == [
        ("user", "User"),
        ("assistant", "Hermes"),
    ] * 3
    assert [content for _, role, _, content in rows if role == "user"] == [
        "hello bot",
        "what is up?",
        "third message",
    ]
    assert all(content for *_, content in rows)  # never an empty reply
    assert watermark == rows[3][0]  # /reset hid the first two exchanges, deleted nothing


def test_console_script_ends_cleanly_on_eof(runs: dict[str, Run | None]):
    run = runs["eof"]
    if run is None:
        pytest.skip("the hermes-bot console script is not installed")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == ""  # not a terminal: no banner, no prompt, nothing to answer


def test_missing_model_is_reported_without_traceback(runs: dict[str, Run | None]):
    run = runs["missing"]
    assert run is not None
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "hermes-bot: cannot load" in run.stderr and "no-such-model-dir" in run.stderr


def test_database_from_a_newer_bot_is_reported_without_traceback(runs: dict[str, Run | None]):
    run = runs["future-db"]
    assert run is not None
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hermes-bot: the database is schema version 99")
    assert run.stdout == ""
