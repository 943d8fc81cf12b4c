"""Settings: validation messages, the `.env` file, the CLI's exit codes, secrets never printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, env_example, load_settings, settings_table

# (key, bad value, text the one-line message must contain besides the key)
INVALID = [
    ("ENGINE", "gpu", "auto, local, llamacpp, openai"),
    ("QUANTIZATION", "2bit", "none, 8bit, 4bit"),
    ("DTYPE", "fp8", "auto, bfloat16, float16, float32"),
    ("LOG_LEVEL", "loud", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("CONTEXT_TOKENS", "lots", "a whole number"),
    ("CONTEXT_TOKENS", "100", "256 to 131072"),
    ("MAX_NEW_TOKENS", "0", "1 to 8192"),
    ("MAX_NEW_TOKENS", "1.5", "a whole number"),
    ("TEMPERATURE", "hot", "a number"),
    ("TEMPERATURE", "nan", "0.0 to 5.0"),
    ("TOP_P", "1.5", "0.0 to 1.0"),
    ("TOP_K", "-1", "0 to 1000"),
    ("ALLOW_DMS", "maybe", "true or false"),
    ("OWNER_IDS", "123,abc", "comma-separated numeric ids"),
    ("DEV_GUILD_ID", "-5", "at least 0"),
    ("METRICS_PORT", "70000", "0 to 65535"),
]


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


@pytest.mark.parametrize(("key", "value", "accepted"), INVALID)
def test_invalid_value_is_one_clear_line(key: str, value: str, accepted: str, settings_factory):
    with pytest.raises(SettingsError) as info:
        settings_factory(**{key: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key}={value!r}")
    assert accepted in message


def test_valid_values_are_converted(settings_factory, tmp_path):
    s = settings_factory(
        ENGINE=" OpenAI ",
        LOG_LEVEL="debug",
        CONTEXT_TOKENS="2048",
        TEMPERATURE="0",
        ALLOW_DMS="off",
        OWNER_IDS="1, 22,333",
        QUANTIZATION="",  # empty means "use the default"
    )
    assert (s.engine, s.log_level, s.context_tokens) == ("openai", "DEBUG", 2048)
    assert s.temperature == 0.0 and s.allow_dms is False
    assert s.owner_ids == (1, 22, 333)
    assert s.quantization == "none"
    assert s.db_path == tmp_path / "hermes.db"


def test_env_file_is_read_and_process_env_wins(tmp_path):
    env_file = tmp_path / "settings.env"
    env_file.write_text(
        '# comment\nMAX_NEW_TOKENS=77\nTEMPERATURE=0.3\nSYSTEM_PROMPT="Be brief."\n',
        encoding="utf-8",
    )
    s = load_settings(env={"MAX_NEW_TOKENS": "55"}, env_file=env_file)
    assert s.max_new_tokens == 55  # the process environment overrides the file
    assert s.temperature == 0.3  # the file overrides the default
    assert s.system_prompt == "Be brief."
    assert load_settings(env={}, env_file=None).max_new_tokens == Settings().max_new_tokens
    assert load_settings(env={}, env_file=tmp_path / "absent.env") == Settings()


def test_bad_value_in_env_file_is_reported(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("TOP_K=many\n", encoding="utf-8")
    with pytest.raises(
        SettingsError, match=r"^TOP_K='many' is not valid; expected a whole number$"
    ):
        load_settings(env={}, env_file=env_file)


def test_redacted_hides_secrets():
    s = Settings(discord_token="abc.def.ghi", openai_api_key="")
    shown = s.redacted()
    assert shown["DISCORD_TOKEN"] == "set"
    assert shown["OPENAI_API_KEY"] == "not set"
    assert "abc.def.ghi" not in repr(shown)
    assert shown["MODEL"] == s.model


def test_every_key_is_documented():
    example, table = env_example(), settings_table()
    for name in Settings.__dataclass_fields__:
        assert f"\n{name.upper()}=" in example
        assert f"| `{name.upper()}` |" in table
    assert "DISCORD_TOKEN=\n" in example  # no secret default


def test_console_with_bad_value_exits_2_without_traceback(cli_env, tmp_path):
    cli_env["ENGINE"] = "gpu"
    proc = run_cli(["console"], cli_env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "ENGINE='gpu'" in lines[0] and "auto, local, llamacpp, openai" in lines[0]


def test_bad_value_in_dotenv_exits_2(cli_env, tmp_path):
    (tmp_path / ".env").write_text("REPETITION_PENALTY=9\n", encoding="utf-8")
    proc = run_cli(["doctor", "--skip-model"], cli_env, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "REPETITION_PENALTY='9' is out of range" in proc.stderr


def test_run_without_token_exits_2_and_says_how(cli_env, tmp_path):
    proc = run_cli(["run"], cli_env, tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "DISCORD_TOKEN is not set" in proc.stderr
    assert ".env" in proc.stderr and "export" in proc.stderr


def test_doctor_reads_dotenv_and_never_prints_the_token(cli_env, tmp_path):
    token = "MTIzNDU2Nzg5.secret-token.XYZ"
    api_key = "sk-very-secret-key"
    (tmp_path / ".env").write_text(
        f"DISCORD_TOKEN={token}\nMAX_NEW_TOKENS=77\nCONTEXT_TOKENS=2048\n", encoding="utf-8"
    )
    cli_env.update(MAX_NEW_TOKENS="55", OPENAI_API_KEY=api_key)
    proc = run_cli(["doctor", "--skip-model"], cli_env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "DISCORD_TOKEN = set" in proc.stdout
    assert "OPENAI_API_KEY = set" in proc.stdout
    assert "discord: token is set" in proc.stdout
    assert token not in out and "secret-token" not in out and api_key not in out
    assert "CONTEXT_TOKENS = 2048" in proc.stdout  # read from .env
    assert "MAX_NEW_TOKENS = 55" in proc.stdout  # the process environment wins
    assert "integrity ok" in proc.stdout
    assert Path(cli_env["DB_PATH"]).is_file()


def test_env_file_option(cli_env, tmp_path):
    other = tmp_path / "prod.env"
    other.write_text("CONTEXT_TOKENS=1024\n", encoding="utf-8")
    proc = run_cli(
        ["--env-file", str(other), "doctor", "--skip-model", "--skip-token"], cli_env, tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CONTEXT_TOKENS = 1024" in proc.stdout
    assert "DISCORD_TOKEN = not set" in proc.stdout
