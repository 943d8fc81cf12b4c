"""The real SmolLM2 GGUF and llama-cpp-python for the llama.cpp tests, or a skip saying why.

The model is the file `~/.cache/hermes-discord/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`
(`HERMES_SMOLLM2_DIR` overrides the folder); its converted transformers folder `hf/` beside it
holds the same tokenizer and chat template, which the tests render prompts with.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    return Path(
        os.environ.get("HERMES_SMOLLM2_DIR", "~/.cache/hermes-discord/smollm2")
    ).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file, or a skip with the reason (the fetch script puts it there)."""
    path = smollm2_dir() / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"the real SmolLM2 GGUF is not at {path}")
    return path


def need_llamacpp() -> None:
    """Skip (with the reason) where the `llamacpp` extra could not be installed."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (the `llamacpp` extra) is not installed"
    )


def chatml(messages: list[dict[str, str]]) -> str:
    """The prompt SmolLM2's own chat template makes (through its transformers tokenizer)."""
    from transformers import AutoTokenizer

    hf = smollm2_dir() / "hf"
    if not (hf / "tokenizer.json").is_file():
        pytest.skip(f"the SmolLM2 transformers folder is not at {hf}")
    tok = AutoTokenizer.from_pretrained(hf)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
