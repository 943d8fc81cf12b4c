"""`hermes-bot` itself: --version, --env-file, plain help, and `doctor` telling the truth.

Each runs the real CLI in a subprocess with a clean environment (`cli_env`), as a user would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from aiohttp import web

from tests.test_openai_engine import free_port


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_version(cli_env, tmp_path):
    proc = run_cli(["--version"], cli_env, tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == f"hermes-bot {metadata.version('hermes-discord')}\n"


def test_missing_env_file_is_an_error(cli_env, tmp_path):
    proc = run_cli(["--env-file", "missing.env", "doctor", "--skip-model"], cli_env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"hermes-bot: --env-file missing.env: no such file ({tmp_path / 'missing.env'})"
    ]
    assert proc.stdout == ""


def test_help_text_is_plain(cli_env, tmp_path):
    for args in (
        [],
        ["run"],
        ["console"],
        ["doctor"],
        ["env-example"],
        ["settings-table"],
    ):
        proc = run_cli([*args, "--help"], cli_env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "`" not in proc.stdout, (args, proc.stdout)
        assert proc.stdout.startswith("usage: hermes-bot")


def test_doctor_counts_a_missing_token_as_a_problem(cli_env, tmp_path):
    proc = run_cli(["doctor", "--skip-model"], cli_env, tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert "PROBLEM: DISCORD_TOKEN is not set" in proc.stdout
    assert proc.stdout.endswith("1 problem(s) found\n")
    assert "all good" not in proc.stdout
    offline = run_cli(["doctor", "--skip-model", "--skip-token"], cli_env, tmp_path)
    assert offline.returncode == 0, offline.stdout
    assert "discord: token is not set (not checked: --skip-token)" in offline.stdout
    assert offline.stdout.endswith("all good\n")


def test_doctor_shows_settings_as_written(cli_env, tmp_path):
    (tmp_path / ".env").write_text("OWNER_IDS=12, 34\nALLOW_DMS=no\n", encoding="utf-8")
    proc = run_cli(["doctor", "--skip-model", "--skip-token"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stdout
    shown = dict(
        line.lstrip().split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line
    )
    assert shown["PERSONAS_DIR"] == ""  # not "."
    assert shown["OWNER_IDS"] == "12,34"  # not "(12, 34)"
    assert shown["ALLOW_DMS"] == "false"
    assert shown["DEV_GUILD_ID"] == "0"
    (plain := tmp_path / "plain").mkdir()  # no .env here
    empty = run_cli(["doctor", "--skip-model", "--skip-token"], cli_env, plain)
    assert "  OWNER_IDS = \n" in empty.stdout and "()" not in empty.stdout


def test_doctor_problem_for_a_metrics_port_in_use(cli_env, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        cli_env["METRICS_PORT"] = str(busy.getsockname()[1])
        proc = run_cli(["doctor", "--skip-model", "--skip-token"], cli_env, tmp_path)
    assert proc.returncode == 1
    assert f"PROBLEM: METRICS_PORT={cli_env['METRICS_PORT']} is already in use" in proc.stdout


async def test_doctor_with_openai_engine_closes_its_session(cli_env, tmp_path, tiny_model):
    """A failing test reply (the server refuses the model) is a problem, and nothing leaks."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no such model"}}, status=404)

    async def ok(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # The server ignores stops and runs on into a longer header: doctor cleans it as a
        # channel's reply would be cleaned, with no stray `#`.
        text = "Hi!\n\n#### Instruction:\nmore"
        chunk = {"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        return resp

    results = {}
    for name, handler in (("refused", refuse), ("served", ok)):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        env = dict(cli_env)
        env.update(
            ENGINE="openai",
            OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1",
            OPENAI_MODEL="hermes",
            TOKENIZER=str(tiny_model),
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "doctor", "--skip-token",
                env=env, cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 300)
        finally:
            await runner.cleanup()
        results[name] = (proc.returncode, out.decode(), err.decode())
    for _code, out, err in results.values():
        assert "Unclosed client session" not in err and "Unclosed" not in err
        assert "Traceback" not in err
        assert "model: hermes on http://127.0.0.1:" in out
    code, out, _ = results["refused"]
    assert code == 1 and "PROBLEM:" in out
    code, out, _ = results["served"]
    assert code == 0, out
    assert "test reply in" in out and "'Hi!'" in out
