"""MODEL and TOKENIZER that cannot be loaded fail at once, in one line that says why.

Through the real `python -m bot console` (and `doctor`) in a subprocess: a folder that is not
there is named with its absolute path; a hub id that is neither reachable nor cached says what
was being loaded and how to use a local folder, without the hub client's retry storm. The hub
is made unreachable by pointing HF_ENDPOINT at a closed local port, and the cache at an empty
(or hand-built) folder, so no test touches the network.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bot.model_source import looks_like_path
from tests.conftest import subprocess_env


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


def hub_env(tmp: Path, *, offline: bool) -> dict[str, str]:
    env = subprocess_env(tmp)
    env.update(HOME=str(tmp / "home"), HF_HOME=str(tmp / "hf"), LOG_LEVEL="WARNING")
    env.pop("HF_HUB_CACHE", None)
    env.pop("TRANSFORMERS_CACHE", None)
    if not offline:
        del env["HF_HUB_OFFLINE"], env["TRANSFORMERS_OFFLINE"]
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    return env


def bot(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(run: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # no retry warnings, nothing twice
    return lines[0]


@pytest.mark.parametrize(
    ("name", "tried"),
    [
        ("models/hermes-7b", "{cwd}/models/hermes-7b"),  # models/ exists, the download failed
        ("./hermes-7b", "{cwd}/hermes-7b"),
        ("/nonexistent", "/nonexistent"),
        ("~/x", "{cwd}/home/x"),
    ],
)
def test_missing_folder_is_named_with_its_absolute_path(name: str, tried: str, tmp_path: Path):
    (tmp_path / "models").mkdir()
    env = hub_env(tmp_path, offline=False)  # even with a "network", a path is never a hub id
    run = bot(["console", "--model", name], env, tmp_path)
    assert run.returncode == 1
    assert one_line(run) == f"hermes-bot: model folder not found: {tried.format(cwd=tmp_path)}"


def test_hub_id_offline_and_not_cached(tmp_path: Path):
    run = bot(
        ["console", "--model", "NousResearch/Nous-Hermes-llama-2-7b"],
        hub_env(tmp_path, offline=True),
        tmp_path,
    )
    assert run.returncode == 1
    line = one_line(run)
    assert line.startswith(
        "hermes-bot: cannot load the model 'NousResearch/Nous-Hermes-llama-2-7b': there is no "
        f"folder {tmp_path}/NousResearch/Nous-Hermes-llama-2-7b, and as a hub id it is not in "
        "the local Hugging Face cache while HF_HUB_OFFLINE is set; "
    )
    assert line.endswith(
        "to use a local folder: hf download NousResearch/Nous-Hermes-llama-2-7b --local-dir "
        "models/Nous-Hermes-llama-2-7b, then MODEL=models/Nous-Hermes-llama-2-7b"
    )


def test_unreachable_hub_and_not_cached(tmp_path: Path):
    # "models/hermes-7b" without a models/ folder could be a hub id: both readings are answered
    run = bot(
        ["console", "--model", "models/hermes-7b"], hub_env(tmp_path, offline=False), tmp_path
    )
    assert run.returncode == 1
    line = one_line(run)
    assert line.startswith(
        f"hermes-bot: cannot load the model 'models/hermes-7b': there is no folder "
        f"{tmp_path}/models/hermes-7b, and as a hub id it is not in the local cache while the "
        "hub cannot be reached; "
    )
    assert "MODEL=models/hermes-7b" in line


def test_missing_tokenizer_is_named_as_the_tokenizer(tiny_model: Path, tmp_path: Path):
    env = hub_env(tmp_path, offline=True)
    env["TOKENIZER"] = "./tok"
    run = bot(["console", "--model", str(tiny_model)], env, tmp_path)
    assert run.returncode == 1
    assert one_line(run) == f"hermes-bot: tokenizer folder not found: {tmp_path}/tok"


def test_cached_hub_id_loads_when_the_hub_is_unreachable(tiny_model: Path, tmp_path: Path):
    """A model downloaded once keeps working without the hub, with one warning."""
    env = hub_env(tmp_path, offline=False)
    repo = Path(env["HF_HOME"]) / "hub" / "models--someone--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env.update(MAX_NEW_TOKENS="4", TEMPERATURE="0")
    run = bot(["console", "--model", "someone/tiny"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "Retry" not in run.stderr
    assert (
        run.stderr.count("the hub cannot be reached; using the cached copy of 'someone/tiny'") == 1
    )


def test_doctor_reports_the_same_line_as_a_problem(tmp_path: Path):
    run = bot(
        ["doctor", "--skip-token", "--model", "./gone"], hub_env(tmp_path, offline=True), tmp_path
    )
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"  PROBLEM: model folder not found: {tmp_path}/gone\n" in run.stdout
    assert run.stdout.endswith("1 problem(s) found\n")


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("NousResearch/Nous-Hermes-llama-2-7b", False),
        ("gpt2", False),
        ("./x", True),
        ("/abs/x", True),
        ("~/x", True),
        ("a/b/c", True),  # a hub id has at most one '/'
        ("runs\\tiny\\hf", True),
        ("has space", True),  # not a valid hub id
        ("-bad", True),
    ],
)
def test_what_looks_like_a_path(name: str, path: bool):
    assert looks_like_path(name) is path
