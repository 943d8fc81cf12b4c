"""GGUF files (llama.cpp's one-file format): checking, loading and converting them.

Many users hold their model as one `.gguf` file. transformers reads it (`from_pretrained(folder,
gguf_file=name)`, with the `gguf` package: `pip install 'hermes-discord[gguf]'`), dequantizing
every tensor to torch weights and building the tokenizer, chat template included, from the
file's metadata. That takes a while (about 18 s for a 135M model on 2 cores), so
`convert_gguf` writes a plain Hugging Face folder once (`hermes-bot convert FILE.gguf OUT/`) and
later loads read safetensors. A model loaded from GGUF refuses `save_pretrained`; a fresh model
built from its config (without the GGUF quantization entry) and given its state_dict saves as a
plain folder. The SmolLM2 fetch script (`python -m tests.real_model`) uses the same function.

`check_gguf` reads only the metadata and one row of each tensor type, so an architecture or a
quantization transformers cannot dequantize is one clear line before loading, not a traceback
after a minute of it. Reading the metadata is not free (the `gguf` package walks the whole
vocabulary: 6-7 s for SmolLM2's 49k tokens on 2 cores), and the model source, the tokenizer and
the model each check the file, so a file's verdict is kept until the file changes.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

#: The extra that carries the `gguf` package.
INSTALL_HINT = "pip install 'hermes-discord[gguf]'"


class GGUFError(ValueError):
    """A GGUF file that cannot be used; the message is one line saying why."""


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a GGUF file (by its name: what users type, and what we check)."""
    return str(path).lower().endswith(".gguf")


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading a .gguf file needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _architectures() -> set[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # the mapping's keys also hold two metadata sections that are not architectures
    return set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def check_gguf(path: str | os.PathLike[str]) -> str:
    """The file's architecture when transformers can load it; GGUFError (one line) otherwise.

    Reads the header (architecture) and dequantizes one row of each tensor type it holds, so an
    unknown architecture or a quantization with no dequantizer is found before loading.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise GGUFError(f"GGUF file not found: {file.absolute()}")
    stat = file.stat()
    return _checked(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _checked(file: Path, size: int, mtime_ns: int) -> str:
    """`check_gguf` of one version of a file (its size and modification time are part of the
    key, so a file replaced in place is read again; a refusal raises and is not kept)."""
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # truncated, not GGUF at all, unknown version
        raise GGUFError(f"{file.name} is not a readable GGUF file: {_first_line(exc)}") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFError(f"{file.name} names no architecture (general.architecture is missing)")
    arch = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    supported = _architectures()
    if arch not in supported:
        raise GGUFError(
            f"{file.name}: the architecture {arch!r} cannot be loaded from GGUF by transformers "
            f"(it can: {', '.join(sorted(supported))}); convert it with llama.cpp's tools or use "
            "the original Hugging Face folder"
        )
    seen: set[Any] = set()
    for tensor in reader.tensors:
        if tensor.tensor_type in seen:
            continue
        seen.add(tensor.tensor_type)
        try:
            gguf.dequantize(tensor.data[:1], tensor.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"{file.name}: the quantization {tensor.tensor_type.name} (tensor {tensor.name}) "
                "cannot be dequantized by the gguf package; use a Q4_0, Q4_1, Q5_*, Q8_0, "
                "K-quant, F16 or F32 file"
            ) from None
    return arch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _split(path: str | os.PathLike[str]) -> tuple[str, str]:
    file = Path(path).expanduser().absolute()
    return str(file.parent), file.name


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer (with the chat template) stored in the GGUF file."""
    from transformers import AutoTokenizer

    check_gguf(path)
    folder, name = _split(path)
    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFError(f"cannot read the tokenizer of {name}: {_first_line(exc)}") from None


def load_gguf_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """`AutoModelForCausalLM` dequantized from the GGUF file; `kwargs` go to `from_pretrained`
    (dtype, device_map, ...)."""
    from transformers import AutoModelForCausalLM

    check_gguf(path)
    folder, name = _split(path)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise GGUFError(f"cannot load the model in {name}: {_first_line(exc)}") from None


def plain_model(model: Any) -> Any:
    """A model that `save_pretrained` writes as a plain folder: a fresh one from `model`'s config
    without the GGUF quantization entry, holding `model`'s weights (shared, not copied)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(fresh.named_buffers()):  # non-persistent ones (rotary inv_freq)
        if buffer.is_meta and name in source_buffers:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = source_buffers[name]
    tensors = [*fresh.named_parameters(), *fresh.named_buffers()]
    missing = [name for name, p in tensors if p.is_meta]
    if missing:
        raise GGUFError(f"the GGUF file holds no weights for {missing[0]}")
    fresh.generation_config = model.generation_config
    fresh.eval()
    return fresh


def convert_gguf(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the GGUF file's model and tokenizer as a plain Hugging Face folder at `out`.

    Written into a temporary folder beside `out` and renamed at the end, so `out` either does
    not exist or is complete (a crash leaves no half folder that later runs would trust). `out`
    must not exist yet: GGUFError otherwise.
    """
    import torch

    target = Path(out).expanduser().absolute()
    if target.exists():
        raise GGUFError(f"{target} already exists; remove it or name a new folder")
    tokenizer = load_gguf_tokenizer(path)
    model = plain_model(load_gguf_model(path, dtype=torch.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
