"""Shared by the llama.cpp tests: the skip where llama-cpp-python is missing, and ChatML prompts
rendered by SmolLM2's own chat template (its transformers tokenizer, `smollm2_hf`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def need_llamacpp() -> None:
    """Skip (with the reason) where the `llamacpp` extra could not be installed."""
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python (the `llamacpp` extra) is not installed"
    )


def chatml(hf: Path, messages: list[dict[str, str]]) -> str:
    """The prompt SmolLM2's own chat template makes for `messages`, ready for the reply."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
