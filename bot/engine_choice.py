"""`choose_engine`: which engine `ENGINE=auto` means on this machine, and why (one line).

- `local`, `llamacpp`, `openai` are taken as written.
- `auto` with a `.gguf` MODEL: `llamacpp` on a machine without CUDA when llama-cpp-python is
  installed (quantized weights as they are, the fastest CPU path); without it, `local`
  (transformers dequantizes the file) and the reason says how to install the extra. With a
  CUDA GPU, `local`.
- `auto` with anything else (a folder or a hub id): `local`.

The reason is what `doctor` prints and `run` logs at start. Outside the engine package (and
importing nothing of it) because `bot.model_source`, which the engine's loaders use, asks it too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

#: The llama-cpp-python version the llamacpp engine is built and tested against (pyproject's
#: `llamacpp` extra pins it).
LLAMA_CPP_VERSION = "0.3.36"
INSTALL_HINT = (
    f"pip install 'hermes-discord[llamacpp]' (llama-cpp-python=={LLAMA_CPP_VERSION}; it "
    "compiles llama.cpp, several minutes the first time)"
)


def llamacpp_installed() -> bool:
    """Whether `llama_cpp` can be imported here (without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (False when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(settings: Any, model: str | None = None) -> tuple[str, str]:
    """(engine name, why) for these settings on this machine."""
    name = model or settings.model
    if settings.engine != "auto":
        return settings.engine, f"ENGINE={settings.engine}"
    if not is_gguf(name):
        return "local", "ENGINE=auto: MODEL is not a .gguf file, so transformers serves it"
    if cuda_available():
        return "local", "ENGINE=auto: a .gguf MODEL and a CUDA GPU, so transformers serves it"
    if llamacpp_installed():
        return "llamacpp", "ENGINE=auto: a .gguf MODEL and no CUDA GPU, so llama.cpp serves it"
    return "local", (
        "ENGINE=auto: a .gguf MODEL and no CUDA GPU, but llama-cpp-python is not installed, so "
        f"transformers dequantizes it (slower); for llama.cpp: {INSTALL_HINT}"
    )
