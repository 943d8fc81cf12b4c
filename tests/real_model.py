"""Where the real SmolLM2-135M-Instruct lives for tests marked `real_model`.

The cache folder is `~/.cache/hermes-discord/smollm2` (`HERMES_SMOLLM2_DIR` overrides it); its
`hf/` holds the fp32 Hugging Face folder with the tokenizer and its ChatML chat template. Tests
that need it skip with the reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def smollm2_dir() -> Path:
    return Path(
        os.environ.get("HERMES_SMOLLM2_DIR") or Path.home() / ".cache/hermes-discord/smollm2"
    )


def smollm2_hf() -> Path:
    """The SmolLM2 HF folder; skips the calling test when it is not there."""
    folder = smollm2_dir() / "hf"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct is not cached at {folder} (fetch it first)")
    return folder


def smollm2_weights() -> Path:
    """The SmolLM2 HF folder with its weights; skips when they are not there."""
    folder = smollm2_hf()
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"SmolLM2-135M-Instruct weights are not cached at {folder}")
    return folder
