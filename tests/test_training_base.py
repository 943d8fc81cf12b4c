"""`hermes-train` from a pretrained local base (`--base PATH`, a folder or a `.gguf` file), and
`--set` numbers read as users type them (`train.lr=1e-5`; PyYAML alone reads YAML 1.1, where
that is a string)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.real_model import RealModel
from tests.tiny_gguf import CHATML, make_gguf
from training.__main__ import main
from training.config import RESOLVED_FILE, ConfigError, load_config, parse_override, read_yaml


@pytest.mark.parametrize(
    ("typed", "value"),
    [("1e-5", 1e-5), ("3e-4", 3e-4), ("1.0e5", 1e5), ("-2E+3", -2000.0), (".5e1", 5.0),
     ("3.0e-3", 3e-3), ("10", 10), ("0.1", 0.1), ("1e5x", "1e5x"), ("true", True)],
)  # fmt: skip
def test_numbers_are_read_as_typed(typed: str, value: object) -> None:
    assert parse_override(f"train.lr={typed}") == ("train.lr", value)
    assert read_yaml(f"lr: {typed}") == {"lr": value}


def test_exponent_floats_reach_the_config(tmp_path: Path) -> None:
    """In `--set` and in the YAML file alike; a word is still refused in one line."""
    file = tmp_path / "run.yaml"
    file.write_text("model: {name_or_path: base}\ntrain: {lr: 1e-5, weight_decay: 1e-2}\n")
    cfg = load_config(file, ["train.min_lr_ratio=5e-2"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.min_lr_ratio) == (1e-5, 1e-2, 5e-2)
    with pytest.raises(ConfigError, match="train.lr: expected float, got 'fast'"):
        load_config(file, ["train.lr=fast"])


def tiny_data(path: Path, n: int = 12) -> Path:
    rows = [
        {"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
        for i in range(n)
    ]
    path.write_text(json.dumps(rows))
    return path


def run_args(tmp_path: Path, base: Path, steps: int, length: int) -> list[str]:
    return [
        "--config", "tiny-cpu", "--base", str(base),
        "--data", f"{tiny_data(tmp_path / 'sums.json')}:alpaca",
        "--set", f"train.output_dir={tmp_path / 'run'}",
        "--set", f"data.prepared_dir={tmp_path / 'run' / 'data'}",
        "--set", f"train.max_steps={steps}", "--set", f"train.save_every={steps}",
        "--set", "train.global_batch_size=1", "--set", f"data.max_length={length}",
        "--set", "train.lr=1e-5", "--set", "train.progress_bar=false",
        "--set", "train.export_dir=null",
    ]  # fmt: skip


def test_prepare_train_export_from_a_gguf_base(tmp_path: Path) -> None:
    """`--base x.gguf`: no from_config, the file's tokenizer and template, plain weights out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = make_gguf(tmp_path / "base.Q8_0.gguf", quant="Q8_0")
    args = run_args(tmp_path, base, steps=2, length=64)
    assert main(["prepare", *args]) == 0
    resolved = yaml.safe_load((tmp_path / "run" / RESOLVED_FILE).read_text())
    assert resolved["model"]["name_or_path"] == str(base)
    assert resolved["model"]["from_config"] is None and resolved["model"]["tokenizer"] is None
    assert resolved["train"]["lr"] == 1e-5
    assert main(["train", "--config", "tiny-cpu", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 0
    out = tmp_path / "model"
    export = ["export", "--config", "tiny-cpu", "--set", f"train.output_dir={tmp_path / 'run'}"]
    assert main([*export, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def test_a_missing_base_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--config", "tiny-cpu", "--base", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"config error: --base {tmp_path / 'nope'}: no such folder or file ({tmp_path / 'nope'})"


@pytest.mark.real_model
@pytest.mark.slow
def test_prepare_train_export_from_smollm2(smollm2: RealModel, tmp_path: Path) -> None:
    """The real 135M model on the CPU: a few steps from its folder, and the export answers in
    its own template with its own end-of-turn token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = run_args(tmp_path, smollm2.hf, steps=2, length=48)
    assert main(["prepare", *args]) == 0
    assert main(["train", "--config", "tiny-cpu", "--set", f"train.output_dir={tmp_path / 'run'}"]) == 0
    out = tmp_path / "model"
    export = ["export", "--config", "tiny-cpu", "--set", f"train.output_dir={tmp_path / 'run'}"]
    assert main([*export, "--out", str(out)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2.hf).chat_template
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    reply = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in reply
