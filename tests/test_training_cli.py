"""`hermes-train` as a user runs it: the offline quick try end to end, flags given once and reused
by the next command of the run, and a hub that cannot be reached failing in one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import subprocess_env
from tests.training_helpers import need_data, need_tokenizer_path
from training.__main__ import main
from training.config import CONFIG_DIR, OVERRIDES_FILE, RESOLVED_FILE


@pytest.mark.slow
def test_quick_try_offline_prepare_train_export_then_the_console_answers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokenizer, data = need_tokenizer_path(), need_data() / "code_alpaca_2k.json"
    monkeypatch.chdir(tmp_path)  # tiny-cpu writes runs/tiny under the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = ["--tokenizer", str(tokenizer), "--data", f"{data}:codealpaca"]
    small = ["--set", "train.max_steps=3", "--set", "train.progress_bar=false"]
    assert main(["prepare", "--config", "tiny-cpu", *first, *small]) == 0
    out = capsys.readouterr().out
    assert "wrote 2011 records" in out
    assert "schedule: 2011 records" in out and "4 samples" in out and "503 steps per epoch" in out
    run = tmp_path / "runs" / "tiny"
    saved = yaml.safe_load((run / OVERRIDES_FILE).read_text())["set"]
    assert saved["model.tokenizer"] == str(tokenizer.resolve())
    assert saved["data.sources"] == [
        {"name": "code_alpaca_2k", "path": str(data.resolve()), "format": "codealpaca"}
    ]

    # nothing repeated: train and export find the tokenizer, data and step count in the run
    assert main(["train", "--config", "tiny-cpu"]) == 0
    resolved = yaml.safe_load((run / RESOLVED_FILE).read_text())
    assert resolved["model"]["tokenizer"] == str(tokenizer.resolve())
    assert resolved["train"]["max_steps"] == 3
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]
    assert main(["export", "--config", "tiny-cpu", "--out", str(tmp_path / "model")]) == 0
    assert "point the bot at it with MODEL=" in capsys.readouterr().out

    env = subprocess_env(tmp_path)
    env.update(MAX_NEW_TOKENS="4", TEMPERATURE="0", LOG_LEVEL="WARNING")
    proc = subprocess.run(
        [sys.executable, "-m", "bot", "console", "--model", str(tmp_path / "model")],
        input="Write a haiku about packing.\n",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Hermes> " in proc.stdout


def test_data_flag_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    out = ["--set", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["prepare", "--config", "tiny-cpu", "--data", "x.json:nonsense", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --data x.json:nonsense: unknown format 'nonsense'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("offline", [True, False])
def test_an_unreachable_hub_fails_at_once_naming_the_tokenizer(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    offline: bool,
) -> None:
    data = need_data() / "code_alpaca_2k.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    args = [
        "prepare",
        "--config",
        "tiny-cpu",
        "--set",
        "model.tokenizer=hermes-test/no-such-tokenizer",
        "--set",
        f"train.output_dir={tmp_path / 'run'}",
        "--set",
        f"data.prepared_dir={tmp_path / 'data'}",
        "--data",
        str(data),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    line = err[0]
    assert line.startswith("hermes-train prepare: cannot load the tokenizer ")
    assert "'hermes-test/no-such-tokenizer'" in line and "--tokenizer PATH" in line
    if offline:
        assert "HF_HUB_OFFLINE is set and it is not in the local cache" in line
    else:
        assert "the Hugging Face hub is unreachable (127.0.0.1:9" in line
    assert not (tmp_path / "data").exists()  # nothing was written


def test_a_hub_dataset_fails_at_once_when_the_hub_is_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = need_tokenizer_path()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    args = ["--tokenizer", str(tokenizer), "--set", f"train.output_dir={tmp_path / 'run'}"]
    assert main(["prepare", "--config", "tiny-cpu", *args]) == 1  # its source is hf: codealpaca
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot load the dataset 'sahil280114/codealpaca'" in line
    assert "--data PATH[:FORMAT]" in line


def test_saved_overrides_are_reused_and_replaced_by_new_flags(tmp_path: Path) -> None:
    from training.config import load_run_config, save_run_config

    config = tmp_path / "run.yaml"
    base = yaml.safe_load((CONFIG_DIR / "tiny-cpu.yaml").read_text())
    base["train"]["output_dir"] = str(tmp_path / "out")
    config.write_text(yaml.safe_dump(base))
    first = load_run_config(config, [("train.max_steps", 3), ("model.tokenizer", "/tok/a")])
    assert first.reused == []
    save_run_config(config, first)
    again = load_run_config(config, [("model.tokenizer", "/tok/b")])
    assert again.config.train.max_steps == 3 and again.config.model.tokenizer == "/tok/b"
    assert again.reused == ["train.max_steps"]
    assert (tmp_path / "out" / RESOLVED_FILE).exists()
    # another config file writing to the same folder does not pick them up
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(base))
    assert load_run_config(other, []).config.train.max_steps == 20
