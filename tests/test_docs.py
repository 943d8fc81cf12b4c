"""The docs cannot drift from the code.

- README's settings table is exactly `hermes-bot settings-table`.
- Every shell command in README.md and training/README.md (```bash blocks, and inline code that
  starts with one of the project's commands or pip) is checked: `hermes-bot` and `hermes-train`
  arguments are parsed by the real parsers (and configs loaded), pip extras exist in
  pyproject.toml, `.env` lines name real settings, docker/compose/systemd commands name files,
  build arguments and profiles that exist, scripts accept the flags shown. Commands of tools
  this project does not ship (vllm, sudo, ...) are listed and left alone; an unknown program
  fails the test, so a new kind of command gets a checker.
- The `hermes-bot` commands that run offline (console with a tiny model, doctor, the tables)
  are run as written, through bash, in a folder laid out like a fresh clone.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.settings import Settings, settings_table
from tests.conftest import ROOT, subprocess_env

DOCS = [ROOT / "README.md", ROOT / "training" / "README.md"]
SETTINGS_KEYS = {name.upper() for name in Settings.__dataclass_fields__}
#: Tools the docs mention that this project does not ship; their own docs cover their flags.
EXTERNAL = {"vllm", "python3", "echo", "printf", "sudo", "sqlite3"}
SEPARATORS = {"&&", "||", "|", ";", ">>", ">"}


# --------------------------------------------------------------------------------------------
# Finding the commands


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S)


def block_lines(block: str) -> list[str]:
    """Logical lines of a shell block: continuations joined, comments and blanks dropped."""
    joined = block.replace("\\\n", " ")
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


INLINE_START = re.compile(
    r"^(?:[A-Z_]+=\S+ )*(?:\.venv/bin/)?(?:hermes-bot|hermes-train|pip|python3? -m (?:bot|training))\b"
)


def inline_commands(text: str) -> list[str]:
    return [span for span in re.findall(r"`([^`\n]+)`", text) if INLINE_START.match(span)]


def all_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in shell_blocks(text):
            found += [(str(doc.relative_to(ROOT)), line) for line in block_lines(block)]
        found += [(str(doc.relative_to(ROOT)), span) for span in inline_commands(text)]
    return found


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a line, split at &&, ||, |, ; (and redirections dropped)."""
    line = re.sub(r"<[\w .-]+>", "PLACEHOLDER", line)  # `MODEL=<export_dir>` in prose
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;>")
    lexer.whitespace_split = True
    words: list[str] = []
    redirect = False
    for word in lexer:
        if word in SEPARATORS:
            if words:
                yield words
            words, redirect = [], word in (">>", ">")
            continue
        if redirect:  # the file after > or >>
            redirect = False
            continue
        words.append(word)
    if words:
        yield words


# --------------------------------------------------------------------------------------------
# Checking them


class Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_hermes_bot(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`hermes-bot ARGS` through the real parser, stopping before anything runs."""
    from bot.__main__ import main

    original = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        raise Parsed(original(self, *a, **kw))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        try:
            main(args)
        except Parsed:
            return
        except SystemExit as exc:
            assert exc.code == 0, f"hermes-bot {shlex.join(args)}: argparse refused it"
            return
    raise AssertionError(f"hermes-bot {shlex.join(args)} was not parsed")


def parse_hermes_train(args: list[str]) -> None:
    from training.__main__ import build_parser
    from training.config import load_config

    parser = build_parser()
    if len(args) == 1:  # prose naming a subcommand ("`hermes-train eval` runs ...")
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert args[0] in sub.choices, f"hermes-train has no {args[0]!r}"
        return
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"hermes-train {shlex.join(args)}: argparse refused it") from exc
    config = getattr(ns, "config", None)
    if config and "." not in config and not re.fullmatch(r"[A-Z_]+", config):
        load_config(config, ns.overrides)  # a bundled config's name must exist
    # (a .yaml path is the reader's own file; CONFIG is a placeholder in prose)


def check_pip(args: list[str]) -> None:
    assert args[0] == "install", args
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for arg in args[1:]:
        if m := re.fullmatch(r"\.(?:\[(.*)\])?", arg):
            for extra in filter(None, (m.group(1) or "").split(",")):
                assert extra in extras, f"pip install {arg}: no extra {extra!r} in pyproject.toml"
    if "--index-url" in args:
        assert args[args.index("--index-url") + 1].startswith("https://download.pytorch.org/")


def check_script_flags(script: str, args: list[str]) -> None:
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    flags = [a.split("=")[0] for a in args if a.startswith("--")]
    if flags:
        out = subprocess.run(
            [sys.executable, str(path), "--help"],
            capture_output=True,
            text=True,
            env=subprocess_env(ROOT),
            timeout=300,
        ).stdout
        for flag in flags:
            assert flag in out, f"{script} has no {flag}"


def check_docker(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    if args[0] == "build":
        for i, arg in enumerate(args):
            if arg == "--build-arg":
                name = args[i + 1].split("=")[0]
                assert re.search(rf"^ARG {name}\b", dockerfile, re.M), f"no ARG {name}"
        assert "." in args
    elif args[0] == "run":
        image = next(a for a in args[1:] if a == "hermes-discord")
        rest = args[args.index(image) + 1 :]
        parse_hermes_bot(rest or ["run"], monkeypatch)  # the entry point is hermes-bot
    elif args[0] == "compose":
        compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
        profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
        for i, arg in enumerate(args):
            if arg == "--profile":
                assert args[i + 1] in profiles, f"compose.yaml has no profile {args[i + 1]}"
    else:
        raise AssertionError(f"docker {args[0]}: no checker")


def check_command(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        key = words.pop(0).split("=")[0]
        assert key in SETTINGS_KEYS, f"{key} is not a setting"
    if not words:
        return
    program = words[0].removeprefix(".venv/bin/")
    args = words[1:]
    if program == "sudo":
        program, args = args[0], args[1:]
    if program in ("python", "python3") and args[:2] == ["-m", "bot"]:
        program, args = "hermes-bot", args[2:]
    if program in ("python", "python3") and args[:2] == ["-m", "training"]:
        program, args = "hermes-train", args[2:]
    if program in ("torchrun", "accelerate"):
        at = args.index("-m")
        assert args[at + 1] == "training", words
        program, args = "hermes-train", args[at + 2 :]
    if program == "hermes-bot":
        parse_hermes_bot(args, monkeypatch)
    elif program == "hermes-train":
        parse_hermes_train(args)
    elif program == "pip":
        check_pip(args)
    elif program in ("python", "python3") and args and args[0].endswith(".py"):
        check_script_flags(args[0], args[1:])
    elif program in ("python", "python3") and args[:2] in (["-m", "venv"], ["-m", "pytest"]):
        pass
    elif program == "hf":
        assert args[0] == "download" and "--local-dir" in args, args
    elif program == "docker":
        check_docker(args, monkeypatch)
    elif program == "cp":
        assert (ROOT / args[0]).exists(), f"cp {args[0]}: no such file"
    elif program == "systemctl":
        units = {p.stem for p in (ROOT / "deploy").glob("*.service")}
        assert any(a in units for a in args) or args == ["daemon-reload"], args
    elif program in EXTERNAL:
        pass
    else:
        raise AssertionError(f"no checker for {program!r} ({shlex.join(words)})")


COMMANDS = all_commands()


def test_commands_were_found():
    docs = {doc for doc, _ in COMMANDS}
    assert docs == {str(doc.relative_to(ROOT)) for doc in DOCS}, docs  # each doc has some
    lines = [line for _, line in COMMANDS]
    assert any("hermes-train" in line for line in lines)
    assert any("hermes-bot console" in line for line in lines)
    assert len(lines) > 30


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[line for _, line in COMMANDS])
def test_command_exists_with_these_flags(doc: str, line: str, monkeypatch: pytest.MonkeyPatch):
    for words in simple_commands(line):
        check_command(words, monkeypatch)


def test_a_drifted_command_is_caught(monkeypatch: pytest.MonkeyPatch):
    """The checker itself: the drift issue 17 found would fail it."""
    for bad in (
        "python -m training export --out models/x",  # no --config
        "hermes-train evaluate",  # prose naming a subcommand that does not exist
        ".venv/bin/hermes-bot console --no-such-flag",
        ".venv/bin/pip install -e '.[cuda]'",
        "SHARDS=2 hermes-bot run",
    ):
        with pytest.raises(AssertionError):
            for words in simple_commands(bad):
                check_command(words, monkeypatch)


def test_settings_table_matches_the_code():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = lines.index("| Key | Default | What it does |")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert "\n".join(lines[start:end]) == settings_table(), (
        "README's settings table differs from `hermes-bot settings-table`; paste its output"
    )


def test_env_example_matches_the_code():
    from bot.settings import env_example

    assert (ROOT / ".env.example").read_text(encoding="utf-8").strip() == env_example().strip()


# --------------------------------------------------------------------------------------------
# Running the ones that run offline


def runnable(line: str) -> bool:
    """hermes-bot commands other than `run` (which needs Discord)."""
    for words in simple_commands(line):
        while words and "=" in words[0]:
            words = words[1:]
        if words and words[0].endswith("hermes-bot") and "run" not in words:
            return True
    return False


@pytest.fixture(scope="module")
def clone(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like a fresh clone after the README's install and model steps."""
    from tests.tiny_gguf import make_gguf

    folder = tmp_path_factory.mktemp("clone")
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real_bin = Path(sys.executable).parent
    for name in ("hermes-bot", "hermes-train", "python", "pip"):
        if (real_bin / name).exists():
            (bin_dir / name).symlink_to(real_bin / name)
    # every relative --model folder the docs name is there (the README's download/train result)
    for _, line in COMMANDS:
        for words in simple_commands(line):
            for flag, value in zip(words, words[1:], strict=False):
                gguf = folder / value
                if value.endswith(".gguf") and not value.startswith(("/", "~")):
                    if not gguf.exists():  # a tiny GGUF where the docs name one
                        gguf.parent.mkdir(parents=True, exist_ok=True)
                        make_gguf(gguf, quant="Q8_0")
                    continue
                if flag == "--model" and not value.startswith(("/", "~")) and "/" in value:
                    target = folder / value
                    if not target.exists() and not (ROOT / value).exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.symlink_to(tiny_model)
    (folder / "prod.env").write_text("MAX_NEW_TOKENS=4\n")
    return folder


def test_offline_commands_run_as_written(clone: Path, tiny_model: Path):
    if not (clone / ".venv" / "bin" / "hermes-bot").exists():
        pytest.skip("the hermes-bot console script is not installed")
    # each distinct command once (the inline ones repeat the blocks without .venv/bin/); every
    # model folder the docs name is the same tiny model in this clone, so commands that differ
    # only in which folder `--model` names run the same code: one of them runs (a .gguf stays
    # distinct, it takes another engine)
    shapes: dict[str, str] = {}  # the command without a folder `--model` -> its first line
    for _, line in COMMANDS:
        line = line.replace(".venv/bin/", "")
        if runnable(line):
            shapes.setdefault(re.sub(r"\s--model\s+(?!\S+\.gguf\b)\S+", "", line), line)
    lines = list(shapes.values())
    assert len(lines) >= 5, lines
    env = subprocess_env(clone)
    env.update(
        MODEL=str(tiny_model),
        MAX_NEW_TOKENS="4",
        TEMPERATURE="0",
        LOG_LEVEL="WARNING",
        DISCORD_TOKEN="not-a-real-token",
    )
    procs = {}
    for i, line in enumerate(lines):
        env["DB_PATH"] = str(clone / f"data-{i}.db")  # they run at once: one database each
        procs[line] = subprocess.Popen(
            ["bash", "-c", re.sub(r"\bhermes-bot\b", ".venv/bin/hermes-bot", line)],
            cwd=clone,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    failures = []
    for line, proc in procs.items():
        out, err = proc.communicate("hello\n", timeout=600)
        if proc.returncode != 0 or "Traceback" in err:
            failures.append(f"{line}\n  exit {proc.returncode}: {out[-300:]} {err[-300:]}")
        if "console" in line:
            assert "Hermes> " in out or "Grumbold> " in out or out == "", (line, out)
    assert not failures, "\n".join(failures)
